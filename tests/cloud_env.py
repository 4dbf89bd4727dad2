"""Fixtures for the cloud tests: a TLS fake hub with a registered device, settings and agents pointing at it."""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.cloud import crypto
from appliance.core.config import Settings
from tests.cloud_fixtures import issue_cert, make_ca
from tests.fakehub.hub import FakeHub

HUB = "fakehub.azure-devices.net"
DEVICE = "clinic-0042"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert, ca = make_ca(d)
    srv_crt, srv_key = issue_cert(ca_key, ca_cert, "localhost", d, "server", server=True)
    dev_crt, dev_key = issue_cert(ca_key, ca_cert, DEVICE, d, "device", server=False)
    other_crt, other_key = issue_cert(ca_key, ca_cert, "someone-else", d, "other", server=False)
    return {
        "ca": ca,
        "server_crt": srv_crt,
        "server_key": srv_key,
        "device_crt": dev_crt,
        "device_key": dev_key,
        "other_crt": other_crt,
        "other_key": other_key,
        "dir": d,
    }


@pytest.fixture(scope="session")
def central_keys() -> dict[str, str]:
    priv, pub = crypto.generate_keypair()
    return {"priv": priv, "pub": pub}


@pytest.fixture
def device_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


@pytest.fixture
def hub(pki: dict[str, Path], device_key: str) -> Iterator[FakeHub]:
    h = FakeHub(HUB, str(pki["server_crt"]), str(pki["server_key"]), str(pki["ca"]))
    h.add_device(DEVICE, key=device_key, x509=True)
    h.start()
    yield h
    h.stop()


def cloud_settings(home: Path, port: int, pki: dict[str, Path], key: str, pub: str, **cloud: Any) -> Settings:
    secrets = home / "secrets"
    secrets.mkdir(parents=True, exist_ok=True)
    (secrets / "device_key").write_text(key)
    base = {
        "enabled": True,
        "hub_hostname": HUB,
        "connect_host": "127.0.0.1",
        "device_id": DEVICE,
        "port": port,
        "ca_file": str(pki["ca"]),
        "cert_file": str(pki["device_crt"]),
        "key_file": str(pki["device_key"]),
        "recipient_keys": {"central-1": pub},
        "backoff_min_s": 0.2,
        "backoff_max_s": 1.0,
        "backoff_jitter_s": 0.2,
        "keepalive_s": 30,
        "health_interval_s": 3600,
    }
    base.update(cloud)
    return Settings(state_dir=home, cloud=base)


def cloud_env(home: Path, port: int, pki: dict[str, Path], key: str, pub: str, **cloud: Any) -> dict[str, str]:
    """The same settings as APPLIANCE_* environment variables, for a subprocess."""
    s = cloud_settings(home, port, pki, key, pub, **cloud)
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env["APPLIANCE_STATE_DIR"] = str(home)
    for k, v in s.cloud.model_dump().items():
        if v is None:
            continue
        env[f"APPLIANCE_CLOUD__{k.upper()}"] = (
            __import__("json").dumps(v) if isinstance(v, (dict, list, bool)) else str(v)
        )
    return env


def wait_for(cond: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
