"""Sender authentication: the central reader accepts a result only from the device IoT Hub authenticated.

A real device connection (X.509 over TLS to the fake hub) sends its genuine result and a forged one claiming
another device (anyone with the public recipient key can seal one). The hub stamps each message with
``iothub-connection-device-id``; ``appliance central decrypt`` reads the exported events, accepts the genuine
result, refuses the forgery and every malformed line, each with its reason, and goes on."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from appliance.cloud import outbox, payload
from appliance.cloud.agent import CloudAgent
from appliance.cloud.deid import load_or_create_device_secret
from appliance.core.config import Settings
from testsupport.cloud import DEVICE, cloud_settings, sample_result
from testsupport.common import PYTHON, ROOT, wait_until
from testsupport.fakehub import FakeHub

pytestmark = pytest.mark.integration
OTHER = "clinic-box-other"


def test_forged_envelope_from_a_real_device_is_refused_the_genuine_one_read(
    home: Path, tmp_path: Path, hub: FakeHub, pki, device_key: str, central_keys
) -> None:
    hub.add_device(OTHER, key=device_key)
    settings = cloud_settings(home, hub.port, pki, device_key, central_keys["pub"], auth="x509")
    secret = load_or_create_device_secret(settings.secrets_dir)
    keys = {"central-1": central_keys["pub"]}
    _, genuine = payload.build_result_message(sample_result(1), settings, secret, recipient_keys=keys)
    impostor = Settings(state_dir=tmp_path / "x", cloud={"device_id": OTHER})  # only the public key needed
    _, forged = payload.build_result_message(sample_result(2), impostor, b"k" * 32, recipient_keys=keys)
    agent = CloudAgent(settings)
    with agent.store.transaction() as conn:
        outbox.enqueue(conn, kind="result", message_id="genuine-1", body=genuine)
        outbox.enqueue(conn, kind="result", message_id="forged-1", body=forged)
    agent.start()
    try:
        msgs = wait_until(lambda: len(hub.messages(DEVICE, "result")) == 2 and hub.messages(DEVICE, "result"), 30)
    finally:
        agent.stop()
    assert all(m.system["iothub-connection-device-id"] == DEVICE for m in msgs)
    assert all(json.loads(m.system["iothub-connection-auth-method"])["type"] == "x509Certificate" for m in msgs)
    assert not hub.messages(OTHER)

    events = [json.dumps(m.event()) for m in msgs]
    genuine_event = json.loads(events[0]) if "genuine" in events[0] else json.loads(events[1])
    env = json.loads(genuine_event["body"])
    hostile = [
        "not json at all",
        "[1, 2]",
        json.dumps({"system_properties": {}, "body": genuine_event["body"]}),  # no hub identity
        json.dumps({"system_properties": {"iothub-connection-device-id": DEVICE}}),  # no body
        json.dumps({"system_properties": {"iothub-connection-device-id": DEVICE}, "body_b64": "!!"}),
        json.dumps({**genuine_event, "body": genuine_event["body"][:200]}),  # truncated envelope
        json.dumps({**genuine_event, "body": json.dumps({**env, "recipients": 5})}),
        json.dumps({**genuine_event, "body": json.dumps({**env, "recipients": [{"kid": "central-1", "epk": "!"}]})}),
        json.dumps({**genuine_event, "body": json.dumps({**env, "meta": {**env["meta"], "device": OTHER}})}),
    ]
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "central-1.key").write_text(central_keys["priv"])
    infile = tmp_path / "events.jsonl"
    infile.write_text("\n".join([*events, *hostile]) + "\n")
    r = subprocess.run(
        [PYTHON, "-m", "appliance", "central", "decrypt", "--key", str(tmp_path / "keys"), str(infile)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1, r.stderr
    accepted = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(accepted) == 1 and accepted[0]["device"] == DEVICE and accepted[0]["meta"]["mid"]
    refused = r.stderr.splitlines()
    assert len(refused) == 1 + len(hostile), r.stderr  # the forgery and each hostile line, one by one
    reasons = [line.split(" refused: ")[1].split(":")[0] for line in refused]
    assert reasons.count("sender_mismatch") == 2 and reasons.count("no_identity") == 1, reasons
    assert set(reasons) <= {"sender_mismatch", "no_identity", "malformed", "undecryptable"}
    assert "Traceback" not in r.stderr
