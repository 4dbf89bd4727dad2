"""The technician's self-test: passes on a healthy box, names what fails, answers the direct method."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest

from appliance.app.methods import run_selftest_method
from appliance.core import audit
from appliance.core.audit import AuditEvent
from appliance.core.config import PacsDestination, Settings
from appliance.core.store import Store
from testsupport.common import PYTHON, ROOT
from testsupport.daemon import daemon_env

pytestmark = pytest.mark.integration


def _selftest(home: Path, env: dict[str, str] | None = None, *args: str) -> tuple[int, dict]:
    r = subprocess.run(
        [PYTHON, "-m", "appliance", "--home", str(home), "selftest", "--json", *args],
        cwd=ROOT,
        env=daemon_env(env),
        capture_output=True,
        text=True,
        timeout=180,
    )
    return r.returncode, json.loads(r.stdout)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once closed


def test_selftest_passes_then_names_each_failure(home: Path) -> None:
    rc, report = _selftest(home, {"APPLIANCE_ENGINES__INSTALL_REFERENCE_BUNDLES": "true"})
    assert rc == 0 and report["ok"], report
    by = {c["name"]: c for c in report["checks"]}
    assert {"config", "disk", "database", "active_bundles", "phantom_chain"} <= set(by)
    assert "cxr-phantom" in by["active_bundles"]["detail"] and "mmg-phantom" in by["active_bundles"]["detail"]
    assert "nodule located within" in by["phantom_chain"]["detail"]

    env = {
        "APPLIANCE_DICOM__MIN_FREE_BYTES": str(10**18),
        "APPLIANCE_PIPELINE__DESTINATIONS": json.dumps(
            [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": _closed_port()}]
        ),
    }
    rc, report = _selftest(home, env)
    by = {c["name"]: c for c in report["checks"]}
    assert rc == 1 and not report["ok"]
    assert not by["disk"]["ok"] and "floor" in by["disk"]["detail"]
    assert not by["pacs:pacs"]["ok"]
    assert by["phantom_chain"]["ok"]  # one failure does not hide the others' results
    rc, report = _selftest(home, env, "--no-pacs")
    assert not any(c["name"].startswith("pacs:") for c in report["checks"])

    # each run is in the audit trail, its failed checks named
    trail = audit.query(Store(home / "state.db"), event=AuditEvent.SELFTEST, newest_first=False)
    assert [(e.outcome, e.detail["failed"]) for e in trail] == [
        ("success", []),
        ("failure", ["disk", "pacs:pacs"]),
        ("failure", ["disk"]),
    ]


def test_selftest_direct_method_payloads(home: Path, clean_env) -> None:
    settings = Settings(state_dir=home)
    settings.pipeline.destinations = [
        PacsDestination(name="down", ae_title="PACS", host="127.0.0.1", port=_closed_port())
    ]
    assert run_selftest_method(settings, {"pacs": "yes"})[0] == 400
    assert run_selftest_method(settings, [1, 2])[0] == 400
    status, report = run_selftest_method(settings, {"pacs": False})
    assert status == 200 and not any(c["name"].startswith("pacs:") for c in report["checks"])
