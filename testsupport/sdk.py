"""Run Microsoft's device SDK (``azure-iot-device``) as a second device client against the fake hub.

The SDK needs paho-mqtt<2 and so lives in its own venv: ``$AZURE_IOT_DEVICE_PYTHON``, else the repository's
``.venv-sdk`` (``bootstrap.sh test`` makes it), else ``/work/sdk-venv``. :class:`SdkDevice` runs
``testsupport/sdk_device.py`` in it and talks to it in JSON lines (see that script).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
from pathlib import Path
from typing import Any

from testsupport.common import ROOT


def sdk_python() -> str | None:
    """The interpreter of the venv holding ``azure-iot-device``, or None."""
    for c in (
        os.environ.get("AZURE_IOT_DEVICE_PYTHON", ""),
        str(ROOT / ".venv-sdk" / "bin" / "python"),
        "/work/sdk-venv/bin/python",
    ):
        if c and os.access(c, os.X_OK):
            return c
    return None


class SdkDevice:
    """One ``azure-iot-device`` client as a subprocess; a context manager (``quit`` and wait on exit).

    ``connection_string``: ``HostName=<hub>;DeviceId=<id>;SharedAccessKey=<key>`` (``GatewayHostName=127.0.0.1``
    is added); ``port``: the fake hub's MQTT port; ``ca``: the PEM CA that signed the hub's certificate.
    """

    def __init__(self, connection_string: str, port: int, ca: Path):
        py = sdk_python()
        if py is None:
            raise RuntimeError("azure-iot-device venv not found: set AZURE_IOT_DEVICE_PYTHON or run bootstrap.sh test")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "DEVICE_CONNECTION_STRING": f"{connection_string};GatewayHostName=127.0.0.1",
            "FAKEHUB_PORT": str(port),
            "FAKEHUB_CA": str(ca),
        }
        self.proc = subprocess.Popen(
            [py, str(ROOT / "testsupport" / "sdk_device.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self._stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                self._stderr.append(line)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def wait_for(self, event: str, timeout: float = 60.0, **match: Any) -> dict[str, Any]:
        """The next event named ``event`` (whose fields equal ``match``); AssertionError with the SDK's stderr
        if it does not come within ``timeout`` seconds or the process ends."""
        while True:
            try:
                doc = self.events.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(
                    f"SDK device: no {event!r} within {timeout}s; stderr: {''.join(self._stderr)[-3000:]}"
                ) from None
            self.seen.append(doc)
            if doc.get("event") == event and all(doc.get(k) == v for k, v in match.items()):
                return doc

    def __enter__(self) -> SdkDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send(cmd="quit")
                self.proc.wait(20)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
