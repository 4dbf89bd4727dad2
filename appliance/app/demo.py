"""``appliance demo``: a newcomer's first minute with the box.

Starts the real daemon (``appliance run``) on a home of its own with the reference bundles, writes three
phantom studies (a chest with a nodule, a normal chest, a 4-view mammogram with a mass in the left breast),
sends them over DICOM C-STORE exactly as a modality would (the exporter's SCU), and shows each study's
findings and the SR/SC files as they come back. Nothing here is demo-only logic beyond the choreography:
the studies go through the same SCP, assembler, router, engines and result builders as in a clinic.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.core.config import PacsDestination, Settings
from appliance.lifecycle.studies import EXPORTED, FAILED, INFERRED, NO_MODEL, NOT_PROCESSABLE

DONE = (INFERRED, EXPORTED, NO_MODEL, NOT_PROCESSABLE, FAILED)
DAEMON_ENV = {
    "APPLIANCE_DICOM__BIND": "127.0.0.1",
    "APPLIANCE_DICOM__PORT": "0",  # the kernel picks a free port; status.json says which
    "APPLIANCE_DICOM__QUIET_SECONDS": "0.5",
    "APPLIANCE_API__PORT": "0",  # the dashboard (on by default) on a free port too; status.json says which
    "APPLIANCE_DICOM__MIN_FREE_BYTES": str(100 * 1024**2),
    "APPLIANCE_PIPELINE__ENABLED": "true",
    "APPLIANCE_PIPELINE__POLL_S": "0.2",
    "APPLIANCE_ENGINES__INSTALL_REFERENCE_BUNDLES": "true",
    "APPLIANCE_ENGINES__TRUST_DEMO_KEY": "true",
}


# The same settings as a configuration file in the demo's home (``demo.toml``), so that the commands the demo
# suggests afterwards (``selftest``, ``model list``, ``status``) see the box as the demo ran it: trusting the
# demo key, with the reference bundles. The ports stay in the environment: 0 means "any free one" only once.
DEMO_CONFIG: dict[str, dict[str, object]] = {
    "dicom": {"bind": "127.0.0.1", "quiet_seconds": 0.5, "min_free_bytes": 100 * 1024**2},
    "pipeline": {"enabled": True, "poll_s": 0.2},
    "engines": {"install_reference_bundles": True, "trust_demo_key": True},
}


def write_demo_config(home: Path) -> Path:
    """Write ``DEMO_CONFIG`` as TOML to ``<home>/demo.toml`` (replacing it); returns its path."""
    lines = ["# written by `appliance demo`: the demo's settings (NOT FOR CLINICAL USE: trusts the public demo key)"]
    for section, values in DEMO_CONFIG.items():
        lines.append(f"\n[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]  # JSON scalars are TOML scalars
    path = home / "demo.toml"
    home.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@dataclass
class DemoStudy:
    name: str
    study_uid: str
    files: list[Path]


def write_studies(out: Path) -> list[DemoStudy]:
    from engines.reference.phantoms import chest_study, mammo_study

    made = [
        ("chest, one nodule", chest_study(out, seed=1, nodules=1)),
        ("chest, normal", chest_study(out, seed=2, nodules=0)),
        ("mammogram, mass in the left breast", mammo_study(out, seed=5, masses={"L": 1})),
    ]
    return [DemoStudy(name, s["study_uid"], [Path(f) for f in s["files"]]) for name, s in made]


def start_daemon(home: Path, config: Path | None, timeout: float = 60.0) -> tuple[subprocess.Popen, dict[str, Any]]:
    """``python -m appliance --home HOME run`` in the background; returns once it listens (its status.json)."""
    home.mkdir(parents=True, exist_ok=True)
    status_file = home / "run" / "status.json"
    status_file.unlink(missing_ok=True)
    args = [sys.executable, "-m", "appliance", "--home", str(home)]
    if config is not None:
        args += ["--config", str(config)]
    env = {**os.environ, **DAEMON_ENV}
    log = open(home / "demo-daemon.log", "ab")  # noqa: SIM115 - handed to the child process
    proc = subprocess.Popen([*args, "run"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the appliance exited with {proc.returncode}; see {home / 'demo-daemon.log'}")
            try:
                doc = json.loads(status_file.read_text(encoding="utf-8"))
                if doc.get("pid") == proc.pid:
                    return proc, doc
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the appliance did not start within {timeout:g} s; see {home / 'demo-daemon.log'}")
    except BaseException:  # not started in time, or interrupted (Ctrl-C, SIGTERM) while starting: never leave it
        stop_daemon(proc)
        raise


def stop_daemon(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def send_study(settings: Settings, scp: dict[str, Any], study: DemoStudy) -> list[str]:
    """C-STORE the study's files to the running appliance (one association); the failures, if any."""
    from appliance.delivery.export import send

    dest = PacsDestination(name="appliance", ae_title=scp["ae_title"], host="127.0.0.1", port=int(scp["port"]))
    outcomes = send(settings, dest, list(enumerate(study.files)))
    return [f"{study.files[o.export_id].name}: {o.error}" for o in outcomes if not o.ok]


def _db_rows(home: Path, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
    path = home / "state.db"
    if not path.exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError:  # schema not there yet
        return []
    finally:
        conn.close()


def wait_for_results(
    home: Path, studies: list[DemoStudy], on_done: Callable[[DemoStudy, sqlite3.Row, list[dict]], None], timeout: float
) -> list[DemoStudy]:
    """Call ``on_done(study, study row, result summaries)`` as each study finishes; returns those that did not."""
    pending = list(studies)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for study in list(pending):
            rows = _db_rows(
                home, "SELECT * FROM studies WHERE study_uid=? ORDER BY revision DESC LIMIT 1", (study.study_uid,)
            )
            if rows and rows[0]["state"] in DONE:
                results = _db_rows(home, "SELECT summary FROM results WHERE study_id=?", (rows[0]["id"],))
                on_done(study, rows[0], [json.loads(r["summary"]) for r in results])
                pending.remove(study)
        time.sleep(0.1)
    return pending
