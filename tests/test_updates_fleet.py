"""Acceptance, end to end: the central team publishes once, two boxes update themselves.

``appliance central repo init|publish`` writes the TUF repository to Azurite (Blob Storage emulator, HTTPS with
the test CA); ``appliance central rollout`` sets both devices' director through the fake hub's service API; two
running daemons (fake IoT Hub over TLS) download from the blob container over HTTPS, go through every state and
report ``active``; ``appliance central status`` shows it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from appliance.updates import layout
from engines import runtime
from engines.keys import TrustStore, key_id, public_key_b64, write_public_key
from testsupport.azurite import Azurite, azurite_binary
from testsupport.bundles import make_bundle, new_key
from testsupport.cloud import cloud_env
from testsupport.common import PYTHON, ROOT, wait_until
from testsupport.daemon import daemon_env, running_daemon
from testsupport.fakehub import FakeHub

pytestmark = pytest.mark.integration

BOXES = ("clinic-a", "clinic-b")
ORDER = ["waiting_window", "downloading", "verifying", "compiling", "validating", "activating", "health_gate", "active"]


def _central(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "appliance", "central", *args],
        env=daemon_env({**env, "COLUMNS": "200"}),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )


def _states(hub: FakeHub, device: str) -> list[str]:
    out: list[str] = []
    for p in hub.reported_patches(device):
        doc = (p.get(layout.REPORTED_KEY) or {}).get("tiny")
        if doc and (not out or out[-1] != doc["state"]):
            out.append(doc["state"])
    return out


def test_publish_to_blob_storage_rollout_to_two_boxes_both_active(
    tmp_path: Path, pki: dict[str, Path], central_keys: Any
) -> None:
    if azurite_binary() is None:
        pytest.fail("azurite-blob not installed: run ./bootstrap.sh test (npm install) or set AZURITE_BLOB")
    key = new_key()
    write_public_key(key, tmp_path / "signer.pub")
    b100 = make_bundle(tmp_path, key, version="1.0.0")
    b110 = make_bundle(tmp_path, key, version="1.1.0", gain=2.0)
    template = tmp_path / "template"
    runtime.install_bundle(
        template / "models",
        b100,
        TrustStore.from_config({key_id(key): public_key_b64(key)}),
        runtime.EngineOptions(backend="ort"),
    )
    hub = FakeHub("fakehub.azure-devices.net", str(pki["server_crt"]), str(pki["server_key"]), str(pki["ca"]))
    sas = {d: base64.b64encode(os.urandom(32)).decode() for d in BOXES}
    for d in BOXES:
        hub.add_device(d, key=sas[d])
    with (
        Azurite(tmp_path / "azurite", cert=pki["server_crt"], key=pki["server_key"]) as az,
        hub,
    ):
        blob = {
            "APPLIANCE_CENTRAL_BLOB_CONNECTION_STRING": az.connection_string,
            "APPLIANCE_CENTRAL_BLOB_CA_FILE": str(pki["ca"]),
            "APPLIANCE_ENGINES__TRUST_DEMO_KEY": "false",
        }
        repo = ["--repo", str(tmp_path / "repo"), "--keys", str(tmp_path / "keys")]
        r = _central(blob, "repo", "init", *repo, "--public-read")
        assert r.returncode == 0, r.stderr
        r = _central(blob, "repo", "publish", str(b110), *repo, "--trusted-key", str(tmp_path / "signer.pub"))
        assert r.returncode == 0, r.stderr
        url = f"{az.blob_endpoint}/{layout.DEFAULT_CONTAINER}"
        assert url.startswith("https://")

        envs = []
        for d in BOXES:
            home = tmp_path / d
            shutil.copytree(template, home)
            env = {
                k: v
                for k, v in cloud_env(home, hub.port, pki, sas[d], central_keys["pub"], device_id=d).items()
                if k.startswith("APPLIANCE_CLOUD__")
            }
            env.update(
                APPLIANCE_PIPELINE__ENABLED="true",
                APPLIANCE_PIPELINE__POLL_S="0.2",
                APPLIANCE_ENGINES__BACKEND="ort",
                APPLIANCE_ENGINES__TRUST_DEMO_KEY="false",
                APPLIANCE_ENGINES__TRUSTED_KEYS=json.dumps({key_id(key): public_key_b64(key)}),
                APPLIANCE_UPDATES__ENABLED="true",
                APPLIANCE_UPDATES__REPOSITORY_URL=url,
                APPLIANCE_UPDATES__ROOT_FILE=str(tmp_path / "repo" / "metadata" / "1.root.json"),
                APPLIANCE_UPDATES__CA_FILE=str(pki["ca"]),
                APPLIANCE_UPDATES__COMPILE_HEADROOM_BYTES="0",
                APPLIANCE_UPDATES__POLL_S="0.2",
            )
            envs.append((home, env))
        service = {
            "IOTHUB_CONNECTION_STRING": hub.service_connection_string(),
            "APPLIANCE_CENTRAL_CA_FILE": str(pki["ca"]),
        }
        with running_daemon(envs[0][0], env=envs[0][1]), running_daemon(envs[1][0], env=envs[1][1]):
            wait_until(lambda: all(hub.is_connected(d) for d in BOXES), timeout=60, what="both boxes connected")
            args = ["--bundle", "tiny", "--version", "1.1.0", "--any-time", "--health-studies", "0"]
            r = _central(service, "rollout", *args, *[x for d in BOXES for x in ("--device", d)])
            assert r.returncode == 0, r.stderr
            for d in BOXES:
                wait_until(lambda d=d: "active" in _states(hub, d), timeout=240, what=f"{d} active")
                assert _states(hub, d)[-8:] == ORDER, (d, _states(hub, d))
                assert hub.twin(d)["reported"][layout.REPORTED_KEY]["tiny"]["active_version"] == "1.1.0"
            st = _central(service, "status", "--json")
            assert st.returncode == 0, st.stderr
            rows = {x["device_id"]: x for x in map(json.loads, st.stdout.splitlines())}
            for d in BOXES:
                assert (rows[d]["bundle_id"], rows[d]["desired"], rows[d]["state"]) == ("tiny", "1.1.0", "active")
            table = _central(service, "status")
            assert sum(1 for ln in table.stdout.splitlines() if "active" in ln and "1.1.0" in ln) == 2, table.stdout
