"""Keep unit tests in process: refuse subprocesses and IP sockets while an unmarked test runs.

``tests/conftest.py`` applies :func:`stay_in_process` to every test not marked ``integration``, so a test
that starts a process or opens a TCP/UDP socket without the mark fails at once instead of silently slowing
``pytest -m "not integration"`` down. Unix socket pairs (asyncio's self-pipe) stay allowed, and so do
threads that were already running when the test began (a client left behind by an earlier integration
test is that test's leak, not this one's).
"""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Callable
from typing import Any

import pytest

HINT = "in a test not marked integration: add @pytest.mark.integration (or a module-level pytestmark)"


class NotAUnitTest(RuntimeError):
    """Raised when a test without the ``integration`` mark starts a process or uses an IP socket."""


def _guarded(name: str, original: Callable[..., Any], refuse: Callable[[Any], bool]) -> Callable[..., Any]:
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if refuse(self):
            raise NotAUnitTest(f"{name} {HINT}")
        return original(self, *args, **kwargs)

    return call


def stay_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Until ``monkeypatch`` undoes it: ``subprocess.Popen`` (and so ``subprocess.run``) and ``bind`` /
    ``connect`` / ``connect_ex`` on IPv4/IPv6 sockets raise :class:`NotAUnitTest` in the main thread and in
    every thread started from now on; threads already running are left alone."""
    main = threading.main_thread()
    earlier = {t for t in threading.enumerate() if t is not main}

    def ours(_: Any) -> bool:
        return threading.current_thread() not in earlier

    def ours_and_ip(sock: socket.socket) -> bool:
        return sock.family in (socket.AF_INET, socket.AF_INET6) and ours(sock)

    monkeypatch.setattr(subprocess.Popen, "__init__", _guarded("starting a process", subprocess.Popen.__init__, ours))
    for name in ("bind", "connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, _guarded(f"socket {name}", getattr(socket.socket, name), ours_and_ip))
