"""Drain rate of the durable outbox vs a raw paho QoS 1 publish loop, same local Mosquitto (TLS), same run.

    PYTHONPATH=. python bench/outbox.py [--messages 3000] [--runs 3] [--inflight 20]

Both sides publish ~2 KB encrypted result messages at QoS 1 with the same in-flight window over TLS 1.2
with a client certificate; the raw loop keeps nothing on disk, the outbox deletes each acknowledged row
in an fsynced SQLite transaction. Prints medians and the ratio (target >= 0.7).
"""

from __future__ import annotations

import argparse
import logging
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.cloud import crypto, outbox, payload  # noqa: E402
from appliance.cloud.agent import CloudAgent  # noqa: E402
from appliance.cloud.client import d2c_topic  # noqa: E402
from appliance.cloud.deid import load_or_create_device_secret  # noqa: E402
from appliance.core.config import Settings  # noqa: E402
from testsupport.cloud import sample_result  # noqa: E402
from testsupport.mosquitto import Mosquitto  # noqa: E402
from testsupport.pki import issue_cert, make_ca  # noqa: E402

DEVICE = "bench-device"


def raw_run(port: int, ca: Path, cert: tuple[Path, Path], bodies: list[tuple[str, bytes]], inflight: int) -> float:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-raw", protocol=mqtt.MQTTv311)
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(*map(str, cert))
    c.tls_set_context(ctx)
    c.max_inflight_messages_set(inflight)
    c.max_queued_messages_set(0)  # unbounded: the whole burst is queued in memory
    done = threading.Event()
    acked = [0]

    def on_publish(client, userdata, mid, rc, props):
        acked[0] += 1
        if acked[0] == len(bodies):
            done.set()

    c.on_publish = on_publish
    c.connect("127.0.0.1", port, 60)
    c.loop_start()
    while not c.is_connected():
        time.sleep(0.01)
    t0 = time.perf_counter()
    for mid, body in bodies:
        props = {"$.mid": mid, "$.ct": "application/json", "$.ce": "utf-8", "type": "result"}
        c.publish(d2c_topic(DEVICE, props), body, qos=1)
    done.wait(300)
    dt = time.perf_counter() - t0
    c.disconnect()
    c.loop_stop()
    return len(bodies) / dt


def outbox_run(
    home: Path, port: int, ca: Path, cert: tuple[Path, Path], bodies: list[tuple[str, bytes]], inflight: int, pub: str
) -> float:
    s = Settings(
        state_dir=home,
        cloud={
            "enabled": True,
            "hub_hostname": "bench.azure-devices.net",
            "connect_host": "127.0.0.1",
            "port": port,
            "device_id": DEVICE,
            "auth": "x509",
            "ca_file": str(ca),
            "cert_file": str(cert[0]),
            "key_file": str(cert[1]),
            "recipient_keys": {"k": pub},
            "max_inflight": inflight,
            "health_interval_s": 86400,
        },
    )
    agent = CloudAgent(s)
    with agent.store.transaction() as conn:
        for mid, body in bodies:
            outbox.enqueue(conn, kind="result", message_id=mid, body=body)
    agent.start()
    while not agent.client.ready:
        time.sleep(0.001)
    t0 = time.perf_counter()
    while agent.sender.sent_total < len(bodies):  # rows deleted after PUBACK, committed (in-memory counter)
        time.sleep(0.002)
    dt = time.perf_counter() - t0
    agent.stop()
    left = agent.store.conn.execute("SELECT COUNT(*) FROM outbox WHERE kind='result'").fetchone()[0]
    assert left == 0, f"{left} results still queued"
    return len(bodies) / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--inflight", type=int, default=20)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench-outbox-"))
    ca_key, ca_cert, ca = make_ca(work)
    srv = issue_cert(ca_key, ca_cert, "localhost", work, "server", server=True)
    dev = issue_cert(ca_key, ca_cert, DEVICE, work, "device", server=False)
    _, pub = crypto.generate_keypair()
    s = Settings(state_dir=work, cloud={"device_id": DEVICE, "recipient_keys": {"k": pub}})
    secret = load_or_create_device_secret(work / "secrets")
    raw_rates, box_rates = [], []
    with Mosquitto(work, ca, *srv) as broker:
        for r in range(args.runs):
            bodies = [
                payload.build_result_message(
                    sample_result(r * 100000 + i + 1), s, secret, recipient_keys=s.cloud.recipient_keys
                )
                for i in range(args.messages)
            ]
            raw_rates.append(raw_run(broker.port, ca, dev, bodies, args.inflight))
            home = work / f"home{r}"
            home.mkdir()
            box_rates.append(outbox_run(home, broker.port, ca, dev, bodies, args.inflight, pub))
            print(f"run {r + 1}: raw paho {raw_rates[-1]:.0f} msg/s, outbox {box_rates[-1]:.0f} msg/s", flush=True)
    size = statistics.median(len(b) for _, b in bodies)
    raw_m, box_m = statistics.median(raw_rates), statistics.median(box_rates)
    print(
        f"messages/run {args.messages}, median body {size:.0f} bytes, "
        f"in-flight window {args.inflight}, runs {args.runs}"
    )
    print(f"raw paho QoS 1 loop: median {raw_m:.0f} msg/s")
    print(f"durable outbox:      median {box_m:.0f} msg/s")
    print(f"ratio outbox/raw:    {box_m / raw_m:.2f} (target >= 0.70)")


if __name__ == "__main__":
    main()
