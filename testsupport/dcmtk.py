"""dcmtk's command-line tools as the modality (``storescu``, ``echoscu``) and as a reference receiver (``storescp``).

Debian's dcmtk builds need ``TCP_NODELAY=1`` in their environment (else ~45 ms per DIMSE message); every run
here gets it. The tools are called by absolute path: the venv's pynetdicom installs its own ``storescu``.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from testsupport.common import HOST, free_port, port_open, wait_until

STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
STORESCP = "/usr/bin/storescp"


def have_dcmtk() -> bool:
    """True when dcmtk's storescu is installed (``apt-get install dcmtk``)."""
    return os.path.exists(STORESCU)


def dcmtk_env() -> dict[str, str]:
    """Environment for dcmtk/Orthanc: Debian's builds need TCP_NODELAY=1 (else ~45 ms per message)."""
    return {**os.environ, "TCP_NODELAY": "1"}


def storescu(
    port: int,
    files: Sequence[Path | str],
    *options: str,
    host: str = HOST,
    aet: str = "STORESCU",
    called: str = "APPLIANCE",
    timeout: float = 120.0,
) -> subprocess.CompletedProcess:
    """dcmtk ``storescu -v -nh`` (continue after failures), stdout+stderr together in ``.stdout``.

    ``options`` go before the address (e.g. ``"-xv"`` to propose JPEG 2000). Raises
    subprocess.TimeoutExpired after ``timeout`` seconds.
    """
    cmd = [STORESCU, "-v", "-nh", "-aet", aet, "-aec", called, *options, host, str(port), *map(str, files)]
    return subprocess.run(
        cmd, env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )


def echoscu(
    port: int, host: str = HOST, aet: str = "ECHOSCU", called: str = "APPLIANCE"
) -> subprocess.CompletedProcess:
    """dcmtk ``echoscu -v`` (one C-ECHO), stdout+stderr together in ``.stdout``."""
    return subprocess.run(
        [ECHOSCU, "-v", "-aet", aet, "-aec", called, host, str(port)],
        env=dcmtk_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=30,
    )


_SENDING = re.compile(r"Sending file: (.+)$")
_RESPONSE = re.compile(r"Received Store Response(?: \(([^)]*)\))?")


def storescu_results(output: str) -> dict[str, str]:
    """file -> response text ("Success", "Out of Resources", ...) as storescu -v reported it.

    A file with no entry was never answered (storescu stopped or the connection broke).
    """
    results: dict[str, str] = {}
    current: str | None = None
    for line in output.splitlines():
        m = _SENDING.search(line)
        if m:
            current = m.group(1).strip()
            continue
        m = _RESPONSE.search(line)
        if m and current is not None:
            results[current] = (m.group(1) or "").strip()
            current = None
    return results


@contextmanager
def storescp(out_dir: Path, *options: str, aet: str = "STORESCP", timeout: float = 10.0) -> Iterator[int]:
    """dcmtk ``storescp`` writing what it receives into ``out_dir``, on 127.0.0.1 and a free port; yields the
    port once it accepts connections, and terminates it on exit.

    ``options`` go before the port (e.g. ``"+B"`` bit-preserving, ``"+uf"`` files named by SOP instance UID).
    Raises AssertionError if it does not listen within ``timeout`` seconds.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        [STORESCP, *options, "-od", str(out_dir), "-aet", aet, str(port)],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def listening() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"storescp exited with {proc.returncode}")
        return port_open(port)

    try:
        wait_until(listening, timeout, "storescp listening")
        yield port
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
