"""The daemon and systemd's notify protocol (``Type=notify``, ``WatchdogSec=``): a real daemon talks to a real
AF_UNIX datagram socket made by the test as ``NOTIFY_SOCKET``: READY=1 once started, WATCHDOG=1 while its
health check passes, none while it fails (state.db locked by another writer), again once it passes, and
STOPPING=1 at stop."""

from __future__ import annotations

import shutil
import socket
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.core.config import DicomConfig
from appliance.core.store import Store
from appliance.ingest.scp import StorageSCP
from appliance.ingest.spool import Spool
from testsupport.daemon import running_daemon

pytestmark = pytest.mark.integration


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A bound AF_UNIX datagram socket (short path: sun_path holds 108 bytes) and its path."""
    folder = tempfile.mkdtemp(prefix="sdn", dir="/tmp")
    path = f"{folder}/notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(folder, ignore_errors=True)


def receive_until(sock: socket.socket, wanted: str, timeout: float) -> list[str]:
    """Every notify message (one per datagram, split on newlines) up to and including one equal to or
    starting with ``wanted``; AssertionError after ``timeout`` seconds."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            data = sock.recv(4096)
        except TimeoutError:
            break
        for line in data.decode().split("\n"):
            seen.append(line)
            if line.startswith(wanted):
                return seen
    raise AssertionError(f"no {wanted!r} within {timeout}s; got {seen[-20:]}")


def receive_for(sock: socket.socket, seconds: float) -> list[str]:
    """Every notify message that arrives within ``seconds``."""
    seen: list[str] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            seen += sock.recv(4096).decode().split("\n")
        except TimeoutError:
            break
    return seen


def test_ready_watchdog_only_while_healthy_and_stopping(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}  # a ping every 0.5 s
    with running_daemon(tmp_path / "home", env=env, timeout=60) as d:
        before = receive_until(sock, "READY=1", 60)
        assert "WATCHDOG=1" not in before  # nothing before the services are up
        assert receive_until(sock, "WATCHDOG=1", 30)
        receive_until(sock, "WATCHDOG=1", 30)  # and again: it is periodic

        # Another writer holds state.db's write lock: the health check fails, the pings stop.
        blocker = sqlite3.connect(tmp_path / "home" / "state.db", isolation_level=None, timeout=30)
        try:
            blocker.execute("BEGIN EXCLUSIVE")
            receive_until(sock, "STATUS=unhealthy: dicom-scp: state database not writable", 60)
            assert "WATCHDOG=1" not in receive_for(sock, 5.0)  # ten ping intervals without a ping
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        after = receive_until(sock, "WATCHDOG=1", 30)  # healthy again: pings resume
        assert "STATUS=running" in after
        assert "health check failed; watchdog pings stopped" in d.logs()
        assert d.stop() == 0
    assert "STOPPING=1" in receive_for(sock, 2.0)


def test_without_watchdog_usec_only_ready_and_stopping(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    with running_daemon(tmp_path / "home", env={"NOTIFY_SOCKET": path}, timeout=60) as d:
        receive_until(sock, "READY=1", 60)
        assert "WATCHDOG=1" not in receive_for(sock, 2.0)
        assert d.stop() == 0
    assert "STOPPING=1" in receive_for(sock, 2.0)


def test_scp_health_names_a_dead_listener(tmp_path: Path) -> None:
    scp = StorageSCP(DicomConfig(port=0, min_free_bytes=0), Store(tmp_path / "state.db"), Spool(tmp_path / "spool"))
    assert scp.health() == "DICOM listener not running"  # not started yet
    scp.start()
    try:
        assert scp.health() is None
        assert scp._server is not None
        scp._server._stop.set()  # the accept loop ends, as if its thread had died
        assert scp._server._thread is not None
        scp._server._thread.join(timeout=10)
        assert scp.health() == "DICOM listener not running"
    finally:
        scp.stop()
