"""The same client against a real Mosquitto with TLS client certificates: plain MQTT resilience."""

from __future__ import annotations

import shutil
import ssl
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from appliance.cloud import outbox, payload
from appliance.cloud.agent import CloudAgent
from appliance.cloud.deid import load_or_create_device_secret
from testsupport.cloud import DEVICE, cloud_settings, sample_result
from testsupport.common import wait_until
from testsupport.mosquitto import MOSQUITTO, Mosquitto
from testsupport.pki import issue_cert, make_ca

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not shutil.which(MOSQUITTO), reason="mosquitto not installed (apt-get install mosquitto)"),
]


def test_outbox_survives_broker_restart_and_cuts_with_client_certs(tmp_path: Path, home: Path, central_keys) -> None:
    ca_key, ca_cert, ca = make_ca(tmp_path)
    srv = issue_cert(ca_key, ca_cert, "localhost", tmp_path, "server", server=True)
    dev = issue_cert(ca_key, ca_cert, DEVICE, tmp_path, "device", server=False)
    col = issue_cert(ca_key, ca_cert, "collector", tmp_path, "collector", server=False)
    broker = Mosquitto(tmp_path, ca, *srv)
    broker.start()
    got: list[str] = []
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="collector", clean_session=False, protocol=mqtt.MQTTv311)
    sub.tls_set_context(ssl.create_default_context(cafile=str(ca)))
    sub._ssl_context.load_cert_chain(*map(str, col))  # type: ignore[attr-defined]
    sub.on_connect = lambda c, u, f, rc, p: c.subscribe(f"devices/{DEVICE}/messages/events/#", 1)
    sub.on_message = lambda c, u, m: got.append(
        next(p.split("=", 1)[1] for p in m.topic.split("/")[-1].split("&") if p.startswith("$.mid="))
    )
    sub.reconnect_delay_set(0.1, 0.5)
    sub.connect("127.0.0.1", broker.port, 30)
    sub.loop_start()
    wait_until(lambda: sub.is_connected(), 10, "collector connected")
    settings = cloud_settings(
        home,
        broker.port,
        {"ca": ca, "device_crt": dev[0], "device_key": dev[1]},
        "unused",
        central_keys["pub"],
        auth="x509",
        max_inflight=50,
    )
    agent = CloudAgent(settings)
    secret = load_or_create_device_secret(settings.secrets_dir)
    ids = []
    with agent.store.transaction() as conn:
        for i in range(600):
            mid, body = payload.build_result_message(
                sample_result(i + 1), settings, secret, recipient_keys=settings.cloud.recipient_keys
            )
            outbox.enqueue(conn, kind="result", message_id=mid, body=body)
            ids.append(mid)
    try:
        agent.start()
        wait_until(lambda: len(got) >= 100, 30, "100 through mosquitto")
        broker.stop()  # broker restart mid-stream (persistence keeps the collector's session)
        broker.start()
        for n in (250, 400):
            wait_until(lambda n=n: len(got) >= n, 30, f"{n} through mosquitto")
            # cut the device mid-stream: a second connection with its client id takes the session over
            intruder = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=DEVICE, protocol=mqtt.MQTTv311)
            ctx = ssl.create_default_context(cafile=str(ca))
            ctx.load_cert_chain(*map(str, col))
            intruder.tls_set_context(ctx)
            intruder.connect("127.0.0.1", broker.port, 30)
            deadline = time.monotonic() + 10
            while not intruder.is_connected() and time.monotonic() < deadline:
                intruder.loop(0.2)  # until the CONNACK: the takeover has really happened
            assert intruder.is_connected(), "the takeover connection never completed"
            intruder.disconnect()
        wait_until(lambda: set(ids) <= set(got), 30, "all 600 results after the cuts")
        wait_until(lambda: agent.status()["outbox"]["by_kind"].get("result", 0) == 0, 20, "outbox drained")
        # really cut and reconnected: the restart and each takeover cost the agent its connection
        wait_until(lambda: agent.client.connects >= 3 and agent.status()["connected"], 20, "reconnected after the cuts")
    finally:
        agent.stop()
        sub.loop_stop()
        broker.stop()
    first = [m for m in dict.fromkeys(got) if m.startswith("res-")]
    assert first == ids  # in order; any duplicate carries an id already delivered
    assert agent.client.connects >= 3  # really cut and reconnected
