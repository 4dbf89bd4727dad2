"""Shared fixtures. Tests start what they need on 127.0.0.1 with ephemeral ports and stop it.

The launchers themselves (dcmtk, Orthanc, Mosquitto, the daemon, the fake IoT Hub) are in ``testsupport/``;
the fixtures here wrap the ones several test modules share. Tests receive them as arguments.

Markers (registered in pyproject.toml): a test that starts a process, opens a network socket or runs a
shipped model end to end is marked ``integration``; everything else is a fast in-process test, and
``pytest -m "not integration"`` runs those alone. The ``_unit_tests_stay_in_process`` guard below makes an
unmarked test that starts a process or opens an IP socket fail, so the mark cannot silently go stale.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.cloud import crypto
from testsupport.cloud import DEVICE, HUB, make_pki
from testsupport.fakehub import FakeHub
from testsupport.guard import stay_in_process
from testsupport.orthanc import Orthanc, have_orthanc


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A fresh state directory."""
    h = tmp_path / "home"
    h.mkdir()
    return h


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No APPLIANCE_* variables leak in from the developer's shell."""
    for k in list(os.environ):
        if k.startswith("APPLIANCE_"):
            monkeypatch.delenv(k)


# -- the clinic PACS ------------------------------------------------------------------------------------------


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """A running Orthanc that accepts the appliance (AE ``APPLIANCE``); skips the test if Orthanc is missing."""
    if not have_orthanc():
        pytest.skip("Orthanc is not installed (apt-get install orthanc)")
    with Orthanc(tmp_path / "orthanc") as pacs:
        yield pacs


# -- the cloud: PKI, keys, the fake IoT Hub -------------------------------------------------------------------


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A test CA with server, device (``DEVICE``) and other-client certificates (see ``make_pki``)."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def central_keys() -> dict[str, str]:
    """The central team's result-encryption key pair: ``{"priv": ..., "pub": ...}`` (base64)."""
    priv, pub = crypto.generate_keypair()
    return {"priv": priv, "pub": pub}


@pytest.fixture
def device_key() -> str:
    """A fresh base64 symmetric (SAS) key for the device."""
    return base64.b64encode(os.urandom(32)).decode()


@pytest.fixture
def hub(pki: dict[str, Path], device_key: str) -> Iterator[FakeHub]:
    """A running fake IoT Hub (TLS, ``HUB``) on a free port, with ``DEVICE`` registered for SAS and X.509."""
    h = FakeHub(HUB, str(pki["server_crt"]), str(pki["server_key"]), str(pki["ca"]))
    h.add_device(DEVICE, key=device_key, x509=True)
    with h:
        yield h


# -- keeping unmarked tests fast ------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _unit_tests_stay_in_process(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests not marked ``integration`` may not start processes or use IP sockets (``testsupport.guard``)."""
    if request.node.get_closest_marker("integration") is None:
        stay_in_process(monkeypatch)
