"""Start the real daemon (``python -m appliance --home H run``) as a subprocess, and talk to it.

Shared by every integration test and benchmark that needs a running appliance::

    with running_daemon(home, env={"APPLIANCE_DICOM__QUIET_SECONDS": "0.3"}) as d:
        storescu(d.port, files)
        wait_until(lambda: d.studies(state="complete"), timeout=10)

The DICOM port defaults to 0 (the kernel picks a free one, no race); the daemon publishes the real
address in ``<home>/run/status.json``, which ``start_daemon`` waits for. The dcmtk tools that talk to it
are in :mod:`testsupport.dcmtk`.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testsupport.common import PYTHON, ROOT, wait_until


def daemon_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A clean environment (no APPLIANCE_* from the shell) with test defaults: ephemeral port, no disk
    floor, short quiet period, pipeline off (receive tests watch studies stay ``complete``; pipeline
    tests pass ``APPLIANCE_PIPELINE__ENABLED=true``), no reference bundles unless a test asks
    (``APPLIANCE_ENGINES__INSTALL_REFERENCE_BUNDLES=true``), and the DEMO key trusted
    (``APPLIANCE_ENGINES__TRUST_DEMO_KEY=true``: tests opt in to it explicitly here, the product default is
    false), web dashboard off (on by default in the product;
    web tests pass ``APPLIANCE_API__ENABLED=true``) and on an ephemeral port when on; ``extra`` overrides them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["APPLIANCE_DICOM__PORT"] = "0"
    env["APPLIANCE_DICOM__MIN_FREE_BYTES"] = "0"
    env["APPLIANCE_DICOM__QUIET_SECONDS"] = "0.5"
    env["APPLIANCE_PIPELINE__ENABLED"] = "false"
    env["APPLIANCE_ENGINES__INSTALL_REFERENCE_BUNDLES"] = "false"
    env["APPLIANCE_ENGINES__TRUST_DEMO_KEY"] = "true"
    env["APPLIANCE_API__ENABLED"] = "false"
    env["APPLIANCE_API__PORT"] = "0"
    env.update(extra or {})
    return env


@dataclass
class Daemon:
    """A started daemon: its process, state directory, log file and the address it published."""

    proc: subprocess.Popen
    home: Path
    log_path: Path
    env: dict[str, str] = field(repr=False)
    status_doc: dict[str, Any] = field(default_factory=dict)

    @property
    def host(self) -> str:
        """The address the DICOM SCP listens on (from status.json)."""
        return self.status_doc["services"]["dicom-scp"]["host"]

    @property
    def port(self) -> int:
        """The DICOM port the kernel picked (from status.json)."""
        return int(self.status_doc["services"]["dicom-scp"]["port"])

    @property
    def web_url(self) -> str:
        """The dashboard's base URL, ``https://127.0.0.1:PORT`` (from status.json; the web service must be on)."""
        web = self.status_doc["services"]["web"]
        return f"https://{web['host']}:{web['port']}"

    @property
    def ae_title(self) -> str:
        """The SCP's AE title (from status.json)."""
        return self.status_doc["services"]["dicom-scp"]["ae_title"]

    def logs(self) -> str:
        """Everything the daemon wrote to stdout/stderr so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the daemon's exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon did not stop within {timeout}s:\n{self.logs()[-3000:]}") from None

    def kill(self) -> None:
        """SIGKILL: a crash, as far as the daemon can tell."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def db(self) -> sqlite3.Connection:
        """Read-only connection to the daemon's state.db (rows as sqlite3.Row)."""
        conn = sqlite3.connect(f"file:{self.home / 'state.db'}?mode=ro", uri=True, timeout=10)
        conn.row_factory = sqlite3.Row
        return conn

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """Rows of one read-only query on state.db."""
        conn = self.db()
        try:
            return conn.execute(sql, tuple(params)).fetchall()
        finally:
            conn.close()

    def studies(self, state: str | None = None) -> list[sqlite3.Row]:
        """Rows of ``studies`` (only those in ``state`` if given), oldest first."""
        if state is None:
            return self.query("SELECT * FROM studies ORDER BY id")
        return self.query("SELECT * FROM studies WHERE state=? ORDER BY id", (state,))

    def instances(self) -> list[sqlite3.Row]:
        """Rows of ``instances``, oldest first."""
        return self.query("SELECT * FROM instances ORDER BY id")

    def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run ``python -m appliance --home H ARGS`` with the daemon's environment."""
        return appliance_cli(self.home, *args, env=self.env, timeout=timeout)


def appliance_cli(
    home: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess:
    """``python -m appliance --home HOME ARGS`` to completion (``daemon_env()`` unless ``env`` is given);
    raises subprocess.TimeoutExpired after ``timeout`` seconds."""
    return subprocess.run(
        [PYTHON, "-m", "appliance", "--home", str(home), *args],
        cwd=ROOT,
        env=env if env is not None else daemon_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_daemon(
    home: Path,
    env: dict[str, str] | None = None,
    config_toml: str | None = None,
    timeout: float = 20.0,
) -> Daemon:
    """Start ``appliance run`` on ``home``; returns once status.json names the listening address.

    ``env`` adds ``APPLIANCE_*`` overrides; ``config_toml`` is written next to ``home`` and passed
    with ``--config``.
    """
    home.mkdir(parents=True, exist_ok=True)
    full_env = daemon_env(env)
    args = [PYTHON, "-m", "appliance", "--home", str(home)]
    if config_toml is not None:
        cfg = home.parent / f"{home.name}.toml"
        cfg.write_text(config_toml, encoding="utf-8")
        args += ["--config", str(cfg)]
    status_file = home / "run" / "status.json"
    status_file.unlink(missing_ok=True)
    log_path = home.parent / f"{home.name}-daemon-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([*args, "run"], cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    daemon = Daemon(proc=proc, home=home, log_path=log_path, env=full_env)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited with {proc.returncode}:\n{daemon.logs()[-3000:]}")
        try:
            doc = json.loads(status_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        if doc.get("pid") != proc.pid:
            return False
        daemon.status_doc = doc
        return True

    try:
        wait_until(ready, timeout=timeout, what="daemon status.json")
    except BaseException:
        daemon.kill()
        raise
    return daemon


@contextmanager
def running_daemon(home: Path, **kwargs: Any) -> Iterator[Daemon]:
    """``start_daemon`` that always stops (SIGTERM, then SIGKILL) the daemon on exit."""
    d = start_daemon(home, **kwargs)
    try:
        yield d
    finally:
        if d.alive():
            with suppress(AssertionError):
                d.stop(timeout=15)


def reference_pipeline_to_pacs(pacs_port: int, pacs_ae: str) -> tuple[str, dict[str, str]]:
    """(config TOML, environment) for a daemon that analyses with the shipped reference bundles on ONNX
    Runtime and sends its results to one PACS (``pacs_ae`` at 127.0.0.1:``pacs_port``), retrying quickly."""
    config = (
        '[engines]\nbackend = "ort"\n'
        "[pipeline]\nenabled = true\npoll_s = 0.2\nretry_initial_s = 0.5\n"
        f'[[pipeline.destinations]]\nname = "pacs"\nae_title = "{pacs_ae}"\nhost = "127.0.0.1"\n'
        f"port = {pacs_port}\n"
    )
    return config, {"APPLIANCE_PIPELINE__ENABLED": "true", "APPLIANCE_ENGINES__INSTALL_REFERENCE_BUNDLES": "true"}
