"""The dashboard's HTTPS server against clients that connect and then send nothing, or a request header a
byte at a time (slowloris): they are cut off, and the dashboard keeps answering everyone else."""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from appliance.core.config import Settings
from appliance.core.store import Store
from appliance.web.metrics import ApplianceMetrics
from appliance.web.ports import WebPorts
from appliance.web.server import WebService
from testsupport.common import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def web(home: Path) -> Iterator[WebService]:
    settings = Settings(state_dir=home)
    settings.api.port = 0
    store = Store(settings.db_path)
    ports = WebPorts(
        selftest=lambda: {"ok": True, "at": "now", "checks": []},
        echo=lambda name: (True, "ok"),
        status_doc=dict,
        listener_up=lambda: True,
    )
    service = WebService(settings, store, ports, ApplianceMetrics())
    service.start()
    try:
        yield service
    finally:
        service.stop()
        store.close()


def _slow_client(port: int, partial: bytes) -> ssl.SSLSocket:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=120))
    if partial:
        s.sendall(partial)
    return s


def test_idle_and_slow_header_connections_are_closed_and_others_still_served(web: WebService) -> None:
    port = int(web.status()["port"])
    held = [_slow_client(port, b"" if i % 2 else b"GET /healthz HTTP/1.1\r\nHost: x\r\n") for i in range(70)]
    try:
        with httpx.Client(verify=False, timeout=30) as client:

            def healthy() -> bool:
                try:
                    return client.get(f"https://127.0.0.1:{port}/healthz").status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(healthy, timeout=90, what="the dashboard answers beside 70 stalled connections")
        for s in held[:4]:  # the server ended them: reading gives end of file (or a reset), not a wait
            s.settimeout(60)
            with contextlib.suppress(ConnectionError, ssl.SSLError):  # a reset is an end too
                assert s.recv(1) == b""
    finally:
        for s in held:
            s.close()
