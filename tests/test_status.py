"""``appliance status`` and the problems it names (``appliance.app.readiness``): each kind of problem, on and
off, the cloud connection as the running daemon reports it, and the export backlog and outbox."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from appliance.app import readiness
from appliance.cli import app
from appliance.cli.daemon_cmds import status_doc
from appliance.core.config import PacsDestination, Settings
from appliance.core.store import Store
from appliance.models.active import demo_key
from tests.test_worklist import analysed_study, chest

pytestmark = pytest.mark.unit

PACS = PacsDestination(name="pacs", ae_title="PACS", host="127.0.0.1", port=104)


@pytest.fixture
def settings(home: Path, clean_env) -> Settings:
    return Settings(state_dir=home)


def cloud_on(settings: Settings, auth: str = "sas") -> Settings:
    settings.cloud.enabled = True
    settings.cloud.hub_hostname = "hub.example.net"
    settings.cloud.device_id = "box-1"
    settings.cloud.auth = auth  # type: ignore[assignment]
    return settings


def keys(problems: list[readiness.Problem]) -> list[str]:
    return [p.key for p in problems]


def test_no_destination_is_a_blocking_problem(settings: Settings) -> None:
    (p,) = [p for p in readiness.problems(settings, None) if p.key == "pipeline.destinations"]
    assert p.blocking and "no PACS destination" in p.message
    settings.pipeline.destinations = [PACS]
    assert readiness.no_destination(settings) is None


def test_device_key_missing_unreadable_malformed_or_present(settings: Settings) -> None:
    assert readiness.device_credentials(settings) is None  # cloud off: nothing to check
    cloud_on(settings)
    key = settings.secrets_dir / "device_key"
    p = readiness.device_credentials(settings)
    assert p is not None and p.blocking and p.key == "cloud.device_key_file" and f"{key} is missing" in p.message
    key.mkdir(parents=True)  # a directory where the key belongs: cannot be read (root reads any file mode)
    p = readiness.device_credentials(settings)
    assert p is not None and "cannot be read" in p.message
    key.rmdir()
    key.write_text("\n")
    p = readiness.device_credentials(settings)
    assert p is not None and f"{key} is empty" in p.message
    key.write_text("not base64 at all!")
    p = readiness.device_credentials(settings)
    assert p is not None and "not a base64 SAS key" in p.message
    key.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    assert readiness.device_credentials(settings) is None
    other = settings.state_dir / "elsewhere.key"
    settings.cloud.device_key_file = str(other)  # the configured file, not the default one
    p = readiness.device_credentials(settings)
    assert p is not None and f"{other} is missing" in p.message


def test_x509_certificate_and_key_must_be_pem(settings: Settings) -> None:
    cloud_on(settings, "x509")
    p = readiness.device_credentials(settings)
    assert p is not None and p.key == "cloud.cert_file" and "device.crt is missing" in p.message
    settings.secrets_dir.mkdir(parents=True)
    (settings.secrets_dir / "device.crt").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    p = readiness.device_credentials(settings)
    assert p is not None and p.key == "cloud.key_file" and "device.key is missing" in p.message
    (settings.secrets_dir / "device.key").write_text("garbage")
    p = readiness.device_credentials(settings)
    assert p is not None and "is not PEM" in p.message
    (settings.secrets_dir / "device.key").write_text("-----BEGIN PRIVATE KEY-----\nMC4C\n-----END PRIVATE KEY-----\n")
    assert readiness.device_credentials(settings) is None


def test_demo_key_trusted_by_flag_or_by_listing_it(settings: Settings) -> None:
    assert readiness.demo_key_trusted(settings) is None  # the product default trusts no public key
    settings.engines.trust_demo_key = True
    p = readiness.demo_key_trusted(settings)
    assert p is not None and not p.blocking and p.key == "engines.trust_demo_key"
    settings.engines.trust_demo_key = False
    assert readiness.demo_key_trusted(settings) is None
    kid, b64 = demo_key()
    settings.engines.trusted_keys = {kid: b64}  # the same key, listed by hand
    assert readiness.demo_key_trusted(settings) is not None
    settings.engines.revoked_keys = [kid]
    assert readiness.demo_key_trusted(settings) is None


def test_api_enabled_without_an_enabled_user(settings: Settings) -> None:
    settings.api.enabled = False
    assert readiness.api_without_users(settings, None) is None  # dashboard off
    settings.api.enabled = True
    assert readiness.api_without_users(settings, None) is not None  # no database yet
    conn = sqlite3.connect(":memory:")
    assert readiness.api_without_users(settings, conn) is not None  # no accounts table
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT, disabled INTEGER NOT NULL DEFAULT 0)")
    conn.execute("INSERT INTO users(name, disabled) VALUES ('old', 1)")
    p = readiness.api_without_users(settings, conn)
    assert p is not None and "appliance user add" in p.message and not p.blocking
    conn.execute("INSERT INTO users(name) VALUES ('admin')")
    assert readiness.api_without_users(settings, conn) is None


def _fake_running(settings: Settings, cloud: dict) -> None:
    """A status.json as the running daemon writes it (this test process stands in for its pid)."""
    run = settings.state_dir / "run"
    run.mkdir(parents=True, exist_ok=True)
    doc = {
        "pid": os.getpid(),
        "started_at": time.time() - 60,
        "updated_at": time.time(),
        "services": {"dicom-scp": {"ae_title": "APPLIANCE", "host": "127.0.0.1", "port": 11112}, "cloud": cloud},
    }
    (run / "status.json").write_text(json.dumps(doc))


def test_status_reports_cloud_connection_backlog_outbox_and_problems(settings: Settings) -> None:
    settings.pipeline.destinations = [PACS]
    store = Store(settings.db_path)
    analysed_study(settings, store, [chest()])
    with store.transaction() as conn:  # the PACS refused one object once
        conn.execute("UPDATE exports SET attempts=1, last_error='association rejected' WHERE id=1")
    cloud_on(settings)
    doc = status_doc(settings)
    assert not doc["running"] and doc["cloud"]["connected"] is None  # not running: unknown, not "disconnected"
    assert doc["exports"]["pending"] == 2 and doc["exports"]["failing"] == 1
    assert doc["exports"]["last_error"] == "association rejected" and doc["outbox"]["depth"] == 0
    assert [(p["key"], p["blocking"]) for p in doc["problems"]] == [
        ("cloud.device_key_file", True),
        ("api.enabled", False),  # the dashboard is on by default and this box has no user
    ]

    _fake_running(settings, {"connected": False, "last_error": "connection refused", "connects": 0})
    doc = status_doc(settings)
    assert doc["running"] and doc["dicom"]["listening"] and doc["cloud"]["connected"] is False
    runner = CliRunner()
    env = {"COLUMNS": "200", "APPLIANCE_CLOUD__ENABLED": "true", "APPLIANCE_CLOUD__DEVICE_ID": "box-1"}
    env["APPLIANCE_CLOUD__HUB_HOSTNAME"] = "hub.example.net"
    env["APPLIANCE_PIPELINE__DESTINATIONS"] = json.dumps([PACS.model_dump()])
    out = runner.invoke(app, ["--home", str(settings.state_dir), "status"], env=env)
    assert out.exit_code == 0, out.output
    assert "cloud: not connected as box-1 to hub.example.net (last error: connection refused)" in out.output
    assert (
        "exports to PACS: 2 pending, oldest" in out.output
        and "1 failing (last error: association rejected)" in out.output
    )
    assert "PROBLEMS (! the box cannot do its job; - fix soon)" in out.output
    assert " ! cloud.device_key_file: cloud enabled but no device key" in out.output

    _fake_running(settings, {"connected": True, "last_error": None, "connects": 1})
    out = runner.invoke(app, ["--home", str(settings.state_dir), "status"], env=env)
    assert "cloud: connected as box-1 to hub.example.net" in out.output
    out = runner.invoke(app, ["--home", str(settings.state_dir), "status", "--json"], env=env)
    assert json.loads(out.output)["cloud"]["connected"] is True


def test_status_of_a_box_that_never_ran(settings: Settings) -> None:
    out = CliRunner().invoke(app, ["--home", str(settings.state_dir), "status"], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert "not running" in out.output and "cloud: off" in out.output and "exports to PACS: none pending" in out.output
    assert " ! pipeline.destinations: no PACS destination configured" in out.output
    assert not settings.db_path.exists()  # looking never creates the database


def test_status_names_the_dashboard_url_and_certificate(settings: Settings) -> None:
    """A newcomer (the demo picks a free port) finds the dashboard from ``appliance status``, not only the log."""
    runner = CliRunner()
    home = ["--home", str(settings.state_dir)]
    out = runner.invoke(app, [*home, "status"], env={"COLUMNS": "200"})
    assert "dashboard: not running; would serve HTTPS on 127.0.0.1:8443" in out.output
    out = runner.invoke(app, [*home, "status"], env={"COLUMNS": "200", "APPLIANCE_API__ENABLED": "false"})
    assert "dashboard: off (api.enabled = false)" in out.output

    _fake_running(settings, {})
    out = runner.invoke(app, [*home, "status"], env={"COLUMNS": "200"})
    assert "dashboard: not serving" in out.output  # running, dashboard on, but the daemon reports no web service
    doc = json.loads((settings.state_dir / "run" / "status.json").read_text())
    web = {"host": "127.0.0.1", "port": 45123, "url": "https://localhost:45123/", "self_signed": True}
    doc["services"]["web"] = {**web, "certificate_sha256": "87:CD:83"}
    (settings.state_dir / "run" / "status.json").write_text(json.dumps(doc))
    out = runner.invoke(app, [*home, "status"], env={"COLUMNS": "200"})
    assert "dashboard: https://localhost:45123/ (self-signed certificate, SHA-256 87:CD:83)" in out.output
    out = runner.invoke(app, [*home, "status", "--json"], env={"COLUMNS": "200"})
    assert json.loads(out.output)["web"]["url"] == "https://localhost:45123/"
