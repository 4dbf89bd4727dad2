"""Field provisioning: DPS registration against the fake DPS over TLS, config + secret written, hub reachable."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.cloud import sas
from appliance.cloud.agent import CloudAgent
from appliance.core.config import load_settings
from testsupport.cloud import HUB
from testsupport.common import ROOT, wait_until
from testsupport.daemon import daemon_env
from testsupport.fakehub import FakeHub

pytestmark = pytest.mark.integration

GROUP_KEY = "Z3JvdXAta2V5LWZvci10ZXN0cy0zMi1ieXRlcy1sb25nISE="


def _provision(home: Path, cfg: Path, hub: FakeHub, pki, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "provisioning", "--config", str(cfg), "--home", str(home), "provision", "dps"]
    cmd += ["--id-scope", hub.id_scope, "--connect-host", "127.0.0.1", "--port", str(hub.port)]
    cmd += ["--ca-file", str(pki["ca"]), "--timeout", "20", *args]
    return subprocess.run(cmd, cwd=ROOT, env=daemon_env(), capture_output=True, text=True, timeout=60)


def test_dps_group_enrollment_provisions_the_box(home: Path, tmp_path: Path, hub: FakeHub, pki, central_keys) -> None:
    hub.add_enrollment_group("clinics", GROUP_KEY)
    cfg = tmp_path / "appliance.toml"
    cfg.write_text('[dicom]\nae_title = "CLINICAI"\n')
    r = _provision(home, cfg, hub, pki, "--registration-id", "clinic-0100", "--group-key", GROUP_KEY)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"assigned to {HUB} as clinic-0100" in r.stdout
    settings = load_settings(cfg)
    assert settings.dicom.ae_title == "CLINICAI"  # the rest of the file is kept
    assert (settings.cloud.enabled, settings.cloud.hub_hostname, settings.cloud.device_id) == (True, HUB, "clinic-0100")
    key_file = home / "secrets" / "device_key"
    assert key_file.read_text().strip() == sas.derive_device_key(GROUP_KEY, "clinic-0100")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    # the provisioned identity really connects to the assigned hub
    settings.state_dir = home
    settings.cloud.connect_host = "127.0.0.1"
    settings.cloud.port = hub.port
    settings.cloud.ca_file = str(pki["ca"])
    settings.cloud.recipient_keys = {"central-1": central_keys["pub"]}
    agent = CloudAgent(settings)
    agent.start()
    try:
        wait_until(lambda: agent.status()["connected"], 15, "provisioned device connected")
    finally:
        agent.stop()


def test_dps_wrong_key_is_refused_and_config_untouched(home: Path, tmp_path: Path, hub: FakeHub, pki) -> None:
    hub.add_enrollment_group("clinics", GROUP_KEY)
    cfg = tmp_path / "appliance.toml"
    cfg.write_text('[dicom]\nae_title = "CLINICAI"\n')
    before = cfg.read_text()
    wrong = "d3JvbmctZ3JvdXAta2V5LWZvci10ZXN0cy0zMi1ieXRlcyE="
    r = _provision(home, cfg, hub, pki, "--registration-id", "clinic-0101", "--group-key", wrong)
    assert r.returncode == 1
    assert "DPS refused the connection" in r.stderr
    assert cfg.read_text() == before
    assert not (home / "secrets" / "device_key").exists()
    r = _provision(home, cfg, hub, pki, "--registration-id", "clinic-0101")  # no credential at all
    assert r.returncode == 2 and "exactly one of" in r.stderr


def test_dps_x509_individual_enrollment(home: Path, tmp_path: Path, hub: FakeHub, pki) -> None:
    hub.add_individual_enrollment("clinic-0042", x509=True)  # the CN of pki's device certificate
    cfg = tmp_path / "appliance.toml"
    r = _provision(
        home,
        cfg,
        hub,
        pki,
        "--registration-id",
        "clinic-0042",
        "--cert",
        str(pki["device_crt"]),
        "--key",
        str(pki["device_key"]),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    c = load_settings(cfg).cloud
    assert (c.auth, c.device_id, c.cert_file) == ("x509", "clinic-0042", str(Path(pki["device_crt"]).resolve()))
    assert not (home / "secrets" / "device_key").exists()
