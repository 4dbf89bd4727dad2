"""Urgent results leave first through the real outbox sender to the fake IoT Hub over TLS: twenty routine
results queued while the hub is down, then one urgent; when the hub comes up the urgent one arrives first,
and only its de-identified payload names the urgent labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.cloud import crypto
from appliance.cloud.agent import CloudAgent
from appliance.cloud.result_messages import CloudResultPublisher
from testsupport.cloud import DEVICE, cloud_settings, sample_result
from testsupport.common import wait_until
from testsupport.fakehub import FakeHub

pytestmark = pytest.mark.integration


def test_an_urgent_result_overtakes_the_routine_backlog(
    home: Path, hub: FakeHub, pki, device_key: str, central_keys
) -> None:
    hub.stop()
    agent = CloudAgent(cloud_settings(home, hub.port, pki, device_key, central_keys["pub"]))
    try:
        publisher = CloudResultPublisher(agent.settings, agent.overlay)
        routine = [publisher.build(sample_result(i), 1) for i in range(1, 21)]
        urgent = publisher.build({**sample_result(99), "urgent": ["mass"]}, 1)
        assert urgent.urgent and not any(m.urgent for m in routine)
        with agent.store.transaction() as conn:
            for m in [*routine, urgent]:  # the urgent one queued last
                assert publisher.enqueue(conn, m)
        agent.start()
        hub.start()
        wait_until(lambda: len(hub.messages(DEVICE, "result")) >= 21, timeout=60, what="21 results")
        got = [m.props["$.mid"] for m in hub.messages(DEVICE, "result")]
        assert got == [urgent.message_id, *(m.message_id for m in routine)]
        keys = {k: central_keys["priv"] for k in agent.settings.cloud.recipient_keys}
        first, second = hub.messages(DEVICE, "result")[:2]
        assert json.loads(crypto.decrypt(first.body, keys)[1])["urgent"] == ["mass"]
        assert "urgent" not in json.loads(crypto.decrypt(second.body, keys)[1])
    finally:
        agent.stop()
