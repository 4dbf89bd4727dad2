"""The cloud agent against the fake IoT Hub over TLS: auth, renewal, twin, methods, C2D, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.cloud import crypto, outbox, payload
from appliance.cloud.agent import CloudAgent
from appliance.cloud.deid import load_or_create_device_secret
from tests.cloud_env import DEVICE, central_keys, cloud_settings, device_key, hub, pki, wait_for  # noqa: F401
from tests.cloud_fixtures import PHI_STRINGS, sample_result
from tests.fakehub.hub import FakeHub


@pytest.fixture
def make_agent(home: Path, hub: FakeHub, pki, device_key: str, central_keys):
    agents = []

    def make(**kw) -> CloudAgent:
        hooks = {k: kw.pop(k) for k in ("method_hooks", "c2d_hook", "reported_hook", "time_fn") if k in kw}
        s = cloud_settings(home, hub.port, pki, device_key, central_keys["pub"], **kw)
        a = CloudAgent(s, **hooks)
        agents.append(a)
        return a

    yield make
    for a in agents:
        a.stop()


def _enqueue_results(agent: CloudAgent, n: int, start: int = 0) -> list[str]:
    secret = load_or_create_device_secret(agent.settings.secrets_dir)
    ids = []
    with agent.store.transaction() as conn:
        for i in range(start, start + n):
            mid, body = payload.build_result_message(sample_result(i + 1), agent.settings, secret)
            outbox.enqueue(conn, kind="result", message_id=mid, body=body)
            ids.append(mid)
    return ids


def test_sas_connect_d2c_properties_and_no_phi(make_agent, hub: FakeHub, central_keys) -> None:
    agent = make_agent()
    ids = _enqueue_results(agent, 3)
    agent.start()
    wait_for(lambda: len(hub.messages(DEVICE, "result")) == 3, what="3 results")
    msgs = hub.messages(DEVICE, "result")
    assert [m.props["$.mid"] for m in msgs] == ids
    m = msgs[0]
    assert m.props["$.ct"] == "application/json" and m.props["$.ce"] == "utf-8"
    assert m.topic.startswith(f"devices/{DEVICE}/messages/events/") and "%2F" in m.topic  # percent-encoded bag
    for t in hub.messages():
        for phi in PHI_STRINGS:
            assert phi.encode() not in t.body and phi not in t.topic
    meta, plain = crypto.decrypt(m.body, {"central-1": central_keys["priv"]})
    assert meta["mid"] == ids[0] and json.loads(plain)["modality"] == "MG"
    wait_for(lambda: agent.store.query("SELECT COUNT(*) FROM outbox WHERE kind='result'")[0][0] == 0, what="sent")
    wait_for(lambda: hub.twin(DEVICE)["reported"].get("software_version"), what="reported properties")
    rep = hub.twin(DEVICE)["reported"]
    assert {"outbox", "disk", "backend", "bundles_active", "software_version"} <= set(rep)
