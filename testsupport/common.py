"""Paths, ephemeral ports and polling shared by every launcher."""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[1]
"""The repository root (the daemon and CLI subprocesses run here, with it on PYTHONPATH)."""
PYTHON = sys.executable
"""The interpreter running the tests; subprocesses use the same one (and so the same venv)."""
HOST = "127.0.0.1"
T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for programs that cannot bind port 0 and report it)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = HOST) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


def wait_until(fn: Callable[[], T], timeout: float = 10.0, what: str = "", *, interval: float = 0.05) -> T:
    """Poll ``fn`` until it returns something truthy and return that value.

    Raises AssertionError naming ``what`` once ``timeout`` seconds have passed (a failed test, not an error).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or fn}")
        time.sleep(interval)
