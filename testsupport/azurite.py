"""Start Azurite (Microsoft's Azure Storage emulator, blob service only) on 127.0.0.1 with an ephemeral port.

The binary is ``azurite-blob`` from npm, found through ``$AZURITE_BLOB``, then the repository's
``node_modules/.bin`` (``bootstrap.sh test`` installs the version pinned in package.json there), then
``/work/azurite/node_modules/.bin``. Azurite binds port 0 and prints the address it listens on; that line is
parsed, so no port is guessed. With ``cert``/``key`` (PEM, e.g. from :mod:`testsupport.pki`) it serves HTTPS,
as Blob Storage does in the field. Accounts: the emulator's well-known development account.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

from testsupport.common import HOST, ROOT

ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
"""The emulator's published development account key (not a secret)."""
_LISTENING = re.compile(r"successfully listens on (https?)://[^:/\s]+:(\d+)")


def azurite_binary() -> str | None:
    """The ``azurite-blob`` executable, or None when it is not installed (see the module docstring)."""
    candidates = [
        os.environ.get("AZURITE_BLOB", ""),
        str(ROOT / "node_modules" / ".bin" / "azurite-blob"),
        "/work/azurite/node_modules/.bin/azurite-blob",
    ]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    return shutil.which("azurite-blob")


class Azurite:
    """One Azurite blob service with its data in ``workdir``; a context manager (start on enter, stop on exit).

    ``cert``/``key``: PEM server certificate and key for HTTPS (the certificate must cover 127.0.0.1).
    After :meth:`start`, :attr:`port`, :attr:`blob_endpoint` and :attr:`connection_string` are set.
    """

    def __init__(self, workdir: Path, *, cert: Path | None = None, key: Path | None = None):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cert, self.key = cert, key
        self.port = 0
        self.scheme = "https" if cert else "http"
        self.proc: subprocess.Popen[str] | None = None
        self._lines: list[str] = []

    def __enter__(self) -> Azurite:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def blob_endpoint(self) -> str:
        """``http(s)://127.0.0.1:<port>/devstoreaccount1`` (path-style, as the emulator addresses accounts)."""
        return f"{self.scheme}://{HOST}:{self.port}/{ACCOUNT}"

    @property
    def connection_string(self) -> str:
        """A storage connection string for the development account at this emulator."""
        return (
            f"DefaultEndpointsProtocol={self.scheme};AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={self.blob_endpoint};"
        )

    def start(self, timeout: float = 60.0) -> None:
        """Start and return once Azurite reports its listening address.

        Raises RuntimeError when the binary is missing, exits, or does not report within ``timeout`` seconds.
        """
        exe = azurite_binary()
        if exe is None:
            raise RuntimeError("azurite-blob not found: set AZURITE_BLOB or run `./bootstrap.sh test` (npm install)")
        cmd = [
            exe,
            "--blobHost",
            HOST,
            "--blobPort",
            "0",
            "--location",
            str(self.dir / "data"),
            "--debug",
            str(self.dir / "debug.log"),
            "--skipApiVersionCheck",
            "--loose",
            "--disableTelemetry",
        ]
        if self.cert and self.key:
            cmd += ["--cert", str(self.cert), "--key", str(self.key)]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL
        )
        found = threading.Event()

        def read(proc: subprocess.Popen[str]) -> None:
            assert proc.stdout is not None
            for line in proc.stdout:  # keeps draining so Azurite never blocks on a full pipe
                self._lines.append(line)
                m = _LISTENING.search(line)
                if m and not found.is_set():
                    self.port = int(m.group(2))
                    found.set()

        threading.Thread(target=read, args=(self.proc,), daemon=True, name="azurite-output").start()
        if not found.wait(timeout):
            out = "".join(self._lines)[-2000:]
            self.stop()
            raise RuntimeError(f"azurite did not report its address within {timeout}s: {out}")

    def output(self) -> str:
        """What Azurite printed so far."""
        return "".join(self._lines)

    def stop(self) -> None:
        """Terminate it (its data stays in the work directory)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
