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
from appliance.models.active import engine_options, reference_bundles, trust_store
from engines import bundle as B
from engines import runtime
from engines.keys import key_id, public_key_b64
from testsupport.bundles import new_key
from testsupport.common import PYTHON, ROOT
from testsupport.daemon import daemon_env
from testsupport.orthanc import AET, Orthanc

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


def _clinic_key_env(home: Path) -> dict[str, str]:
    """A box configured as in a clinic (the central team's key only, no demo key, no reference bundles) with
    the reference models installed as if the central team had signed and sent them."""
    key = new_key()
    env = {
        "APPLIANCE_ENGINES__TRUST_DEMO_KEY": "false",
        "APPLIANCE_ENGINES__TRUSTED_KEYS": json.dumps({key_id(key): public_key_b64(key)}),
    }
    settings = Settings(state_dir=home)
    settings.engines.backend = "ort"
    settings.engines.trusted_keys = {key_id(key): public_key_b64(key)}
    for ref in reference_bundles():
        signed = home.parent / ref.name
        B.sign_bundle(ref, key, signed)
        runtime.install_bundle(settings.models_dir, signed, trust_store(settings), engine_options(settings))
    return env


def test_selftest_passes_then_names_each_failure(home: Path, clean_env, orthanc: Orthanc) -> None:
    clinic = _clinic_key_env(home)
    pacs = [{"name": "pacs", "ae_title": AET, "host": "127.0.0.1", "port": orthanc.dicom_port}]
    rc, report = _selftest(home, {**clinic, "APPLIANCE_PIPELINE__DESTINATIONS": json.dumps(pacs)})
    assert rc == 0 and report["ok"], report
    by = {c["name"]: c for c in report["checks"]}
    assert {"config", "pacs_destination", "cloud_credentials", "disk", "database", "active_bundles"} <= set(by)
    assert {"phantom_chain", "pacs:pacs"} <= set(by)
    assert f"pacs ({AET}@127.0.0.1:{orthanc.dicom_port})" in by["pacs_destination"]["detail"]
    assert by["cloud_credentials"]["detail"] == "cloud sync off"
    assert "cxr-phantom" in by["active_bundles"]["detail"] and "mmg-phantom" in by["active_bundles"]["detail"]
    assert "nodule located within" in by["phantom_chain"]["detail"]
    assert "mammogram with a mass in R: R " in by["phantom_chain"]["detail"]  # the phantom's side, not the demo's

    env = {
        **clinic,
        "APPLIANCE_ENGINES__TRUST_DEMO_KEY": "true",  # a demo setting on this box: a config problem
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
    assert not by["config"]["ok"] and "engines.trust_demo_key" in by["config"]["detail"]
    rc, report = _selftest(home, env, "--no-pacs")
    assert not any(c["name"].startswith("pacs:") for c in report["checks"])

    # each run is in the audit trail, its failed checks named
    trail = audit.query(Store(home / "state.db"), event=AuditEvent.SELFTEST, newest_first=False)
    assert [(e.outcome, e.detail["failed"]) for e in trail] == [
        ("success", []),
        ("failure", ["config", "disk", "pacs:pacs"]),  # the demo key trusted is a config failure, named too
        ("failure", ["config", "disk"]),
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


def test_selftest_fails_naming_the_step_on_a_box_that_cannot_do_its_job(home: Path) -> None:
    """No PACS destination (results would stay on the box) and cloud sync on without a device key (it could
    never connect): each fails its own step, by name, and the whole self-test fails."""
    env = {
        "APPLIANCE_CLOUD__ENABLED": "true",
        "APPLIANCE_CLOUD__HUB_HOSTNAME": "hub.example.net",
        "APPLIANCE_CLOUD__DEVICE_ID": "box-1",
        "APPLIANCE_CLOUD__RECIPIENT_KEYS": json.dumps({"central-1": "A" * 43 + "="}),
    }
    rc, report = _selftest(home, env, "--no-pacs")
    by = {c["name"]: c for c in report["checks"]}
    assert rc == 1 and not report["ok"]
    assert not by["pacs_destination"]["ok"] and "no PACS destination configured" in by["pacs_destination"]["detail"]
    assert not by["cloud_credentials"]["ok"]
    assert f"{home / 'secrets' / 'device_key'} is missing" in by["cloud_credentials"]["detail"]
    assert by["database"]["ok"] and by["disk"]["ok"]  # the rest still ran and passed
    failed = [c["name"] for c in report["checks"] if not c["ok"]]
    assert "pacs_destination" in failed and "cloud_credentials" in failed
    plain = subprocess.run(
        [PYTHON, "-m", "appliance", "--home", str(home), "selftest", "--no-pacs"],
        cwd=ROOT,
        env=daemon_env({**env, "COLUMNS": "200"}),
        capture_output=True,
        text=True,
        timeout=180,
    )
    summary = next((line for line in plain.stdout.splitlines() if line.startswith("FAILED:")), "")
    named = set(summary.removeprefix("FAILED:").replace(",", " ").split())
    assert plain.returncode == 1 and {"pacs_destination", "cloud_credentials"} <= named, plain.stdout
