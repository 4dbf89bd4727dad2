"""A device driven by Microsoft's ``azure-iot-device`` SDK (run it with the SDK's own venv, it needs paho-mqtt<2).

Started by :class:`testsupport.sdk.SdkDevice`; standard library and the SDK only. It connects with a device
connection string (``GatewayHostName=127.0.0.1``; the SDK always dials port 8883, so the fake hub's port comes
in ``FAKEHUB_PORT`` and paho's connect is pointed there: the only thing changed), prints one JSON line per
event on stdout, and obeys JSON commands on stdin, one per line:

    {"cmd": "get_twin"}                  -> {"event": "twin", "twin": {...}}
    {"cmd": "report", "patch": {...}}    -> {"event": "reported", "patch": {...}}
    {"cmd": "echo_updates"}              -> from now on, each desired patch naming model_updates is answered by
                                            reporting every bundle in it as {"state": "waiting_window", "version": v}
    {"cmd": "quit"}                      -> disconnect and exit 0

Every desired-property patch received is printed as {"event": "desired", "patch": {...}}.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import paho.mqtt.client as paho
from azure.iot.device import IoTHubDeviceClient

PORT = int(os.environ["FAKEHUB_PORT"])
_connect = paho.Client.connect


def _connect_to_fake_hub(self, host, port=1883, keepalive=60, *args, **kwargs):  # noqa: ANN001, ANN202
    return _connect(self, host, PORT if port == 8883 else port, keepalive, *args, **kwargs)


paho.Client.connect = _connect_to_fake_hub
lock = threading.Lock()
echo = threading.Event()


def say(doc: dict) -> None:
    with lock:
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()


def main() -> None:
    with open(os.environ["FAKEHUB_CA"]) as fh:
        ca = fh.read()
    client = IoTHubDeviceClient.create_from_connection_string(
        os.environ["DEVICE_CONNECTION_STRING"], server_verification_cert=ca, keep_alive=30
    )

    def on_patch(patch: dict) -> None:
        say({"event": "desired", "patch": patch})
        updates = patch.get("model_updates")
        if echo.is_set() and isinstance(updates, dict):
            reported = {
                bid: {
                    "state": "waiting_window",
                    "version": t.get("version"),
                    "active_version": None,
                    "bytes": 0,
                    "total": None,
                    "reason": None,
                    "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
                for bid, t in (updates.get("bundles") or {}).items()
                if isinstance(t, dict)
            }
            client.patch_twin_reported_properties({"model_updates": reported})
            say({"event": "reported", "patch": {"model_updates": reported}})

    client.on_twin_desired_properties_patch_received = on_patch
    client.connect()
    say({"event": "connected"})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "get_twin":
            say({"event": "twin", "twin": client.get_twin()})
        elif cmd["cmd"] == "report":
            client.patch_twin_reported_properties(cmd["patch"])
            say({"event": "reported", "patch": cmd["patch"]})
        elif cmd["cmd"] == "echo_updates":
            echo.set()
            say({"event": "echoing"})
        elif cmd["cmd"] == "quit":
            break
    client.shutdown()
    say({"event": "bye"})


if __name__ == "__main__":
    main()
