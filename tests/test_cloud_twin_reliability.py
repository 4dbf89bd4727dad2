"""The twin as a reliable control channel: the fake hub (TLS) drops responses and patches, throttles DPS, sends
payloads nested too deep; the cloud agent and DPS client recover by themselves and answer every request."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.cloud.agent import CloudAgent
from appliance.cloud.twin import MAX_TWIN_BYTES, twin_size
from provisioning.dps import DpsError, register
from testsupport.cloud import DEVICE, cloud_settings
from testsupport.common import wait_until
from testsupport.fakehub import FakeHub


@pytest.fixture
def make_agent(home: Path, hub: FakeHub, pki: Any, device_key: str, central_keys: Any):
    agents: list[CloudAgent] = []

    def make(**kw: Any) -> CloudAgent:
        hooks = {k: kw.pop(k) for k in ("method_hooks", "c2d_hook", "reported_hook", "desired_hook") if k in kw}
        s = cloud_settings(home, hub.port, pki, device_key, central_keys["pub"], twin_timeout_s=1.0, **kw)
        a = CloudAgent(s, **hooks)
        agents.append(a)
        return a

    yield make
    for a in agents:
        a.stop()


@pytest.mark.integration
def test_twin_get_whose_response_is_lost_is_asked_again(make_agent, hub: FakeHub) -> None:
    v = hub.update_desired(DEVICE, {"health_interval_s": 77})
    lost = hub.add_fault("$iothub/twin/res/200/*", "drop", count=2, device_id=DEVICE)  # two GET answers lost
    agent = make_agent()
    agent.start()
    wait_until(lambda: agent.twin.version == v, timeout=30, what="twin applied after two lost GET responses")
    assert agent.health_interval_s == 77
    assert len(lost.hits) == 2


@pytest.mark.integration
def test_twin_get_answered_late_is_asked_again_and_the_late_answer_ignored(make_agent, hub: FakeHub) -> None:
    v = hub.update_desired(DEVICE, {"health_interval_s": 66})
    late = hub.add_fault("$iothub/twin/res/200/*", "delay", delay_s=4, count=1, device_id=DEVICE)
    agent = make_agent()
    agent.start()
    wait_until(lambda: agent.twin.version == v, timeout=30, what="twin applied from the second GET")
    assert len(late.hits) == 1 and agent.health_interval_s == 66
    v2 = hub.update_desired(DEVICE, {"health_interval_s": 67})
    wait_until(lambda: agent.twin.version == v2, timeout=20, what="next patch")
    time.sleep(4)  # the delayed answer (the old document) arrives now: it must not undo the newer patch
    assert agent.twin.version == v2 and agent.health_interval_s == 67


@pytest.mark.integration
def test_reported_patch_whose_response_is_lost_is_sent_again(make_agent, hub: FakeHub) -> None:
    agent = make_agent()
    agent.start()
    wait_until(lambda: hub.twin(DEVICE)["reported"].get("software_version"), timeout=20, what="first report")
    before = len(hub.reported_patches(DEVICE))
    lost = hub.add_fault("$iothub/twin/res/204/*", "drop", count=1, device_id=DEVICE)
    agent.report_patch({"probe": 1})
    # the answer never comes: after twin_timeout_s the whole reported document goes again (and is answered)
    wait_until(lambda: len(hub.reported_patches(DEVICE)) >= before + 2, timeout=20, what="reported re-sent")
    assert hub.reported_patches(DEVICE)[before] == {"probe": 1}
    assert "software_version" in hub.reported_patches(DEVICE)[before + 1]
    assert len(lost.hits) == 1


@pytest.mark.integration
def test_lost_desired_patch_is_noticed_by_the_version_gap(make_agent, hub: FakeHub) -> None:
    agent = make_agent()
    agent.start()
    wait_until(lambda: agent.client.ready and agent.twin.version == 1, timeout=20, what="ready")
    lost = hub.add_fault("$iothub/twin/PATCH/properties/desired/*", "drop", count=1, device_id=DEVICE)
    hub.update_desired(DEVICE, {"health_interval_s": 55})  # this notification is lost
    v = hub.update_desired(DEVICE, {"upload_results": False})  # the next one skips a $version
    wait_until(lambda: agent.twin.version == v, timeout=20, what="caught up")
    assert agent.health_interval_s == 55  # the lost patch's value came with the full GET
    assert agent.overlay.current().upload_results is False
    assert len(lost.hits) == 1


@pytest.mark.integration
def test_payloads_nested_too_deep_are_answered_and_logged(
    make_agent, hub: FakeHub, caplog: pytest.LogCaptureFixture
) -> None:
    agent = make_agent()
    agent.start()
    wait_until(lambda: agent.client.ready, timeout=20, what="ready")
    deep = b'{"a":' * 5000 + b"1" + b"}" * 5000
    with caplog.at_level(logging.WARNING):
        status, body = hub.invoke_method(DEVICE, "ping", raw=deep)
        assert status == 400 and "nested too deep" in body["error"], (status, body)  # an answer, not a 504
        assert any("nested too deep" in r.getMessage() + str(r.__dict__) for r in caplog.records)
        v = hub.send_raw_desired(DEVICE, deep)
        wait_until(lambda: agent.twin.status.get("version") == v, timeout=20, what="deep patch answered")
    assert agent.twin.status["status"] == "rejected" and "nested" in agent.twin.status["reason"]
    wait_until(
        lambda: (hub.twin(DEVICE)["reported"].get("desired_status") or {}).get("status") == "rejected",
        timeout=20,
        what="rejection reported",
    )
    assert hub.invoke_method(DEVICE, "ping")[0] == 200


@pytest.mark.integration
def test_c2d_is_acknowledged_only_after_it_was_handled(make_agent, hub: FakeHub) -> None:
    calls: list[Any] = []

    def flaky(props: dict[str, str], body: Any) -> None:
        calls.append(body)
        if len(calls) == 1:
            raise OSError("disk full: could not keep the command")  # not handled: must not be acknowledged

    agent = make_agent(c2d_hook=flaky)
    agent.start()
    wait_until(lambda: agent.client.ready, timeout=20, what="ready")
    hub.send_c2d(DEVICE, b'{"cmd": 1}')
    wait_until(lambda: len(calls) == 1, timeout=20, what="first delivery")
    assert hub.c2d_completed == [] and len(hub.devices[DEVICE].c2d_queue) == 1  # still the hub's to deliver
    hub.disconnect_device(DEVICE)  # the hub delivers unacknowledged messages again on the next connection
    wait_until(lambda: len(calls) == 2, timeout=30, what="redelivery")
    wait_until(lambda: len(hub.c2d_completed) == 1, timeout=20, what="acknowledged once handled")
    assert calls == [{"cmd": 1}, {"cmd": 1}] and not hub.devices[DEVICE].c2d_queue


@pytest.mark.unit
def test_twin_size_is_counted_as_the_hub_counts_it() -> None:
    assert twin_size({"ab": "cd"}) == 4
    assert twin_size({"n": 1.5, "i": 7, "b": True, "z": None}) == 1 + 8 + 1 + 8 + 1 + 4 + 1
    assert twin_size({"o": {"k": [1, "xy"]}, "$version": 9}) == 1 + 1 + 8 + 2  # $-properties are not counted
    assert twin_size({"t": "a\u0001\u0085b"}) == 1 + 2  # C0/C1 control characters are not counted
    numbers = {"v": [123456.789012345] * 4000}  # 4000 numbers: 32 001 by the hub's count, ~76 KB as JSON
    assert twin_size(numbers) == 1 + 8 * 4000 <= MAX_TWIN_BYTES
    assert len(json.dumps(numbers)) > MAX_TWIN_BYTES


def _enroll(hub: FakeHub, reg: str) -> str:
    group_key = base64.b64encode(b"k" * 32).decode()
    hub.add_enrollment_group("g", group_key)
    return base64.b64encode(hmac.new(base64.b64decode(group_key), reg.encode(), hashlib.sha256).digest()).decode()


@pytest.mark.integration
def test_dps_throttled_429_is_retried_after_retry_after(hub: FakeHub, pki: Any) -> None:
    key = _enroll(hub, "box-429")
    throttle = hub.add_fault("$dps/registrations/*", "throttle", direction="from_device", count=2)
    a = register(
        id_scope=hub.id_scope,
        registration_id="box-429",
        symmetric_key=key,
        ca_file=str(pki["ca"]),
        connect_host="127.0.0.1",
        port=hub.port,
        timeout_s=30,
    )
    assert a.status == "assigned" and a.device_id == "box-429"
    assert len(throttle.hits) == 2


@pytest.mark.integration
@pytest.mark.parametrize(
    ("status", "message"),
    [("failed", "Custom allocation failed with status code: 400"), ("disabled", "Enrollment is disabled")],
)
def test_dps_failed_or_disabled_reports_the_services_message(hub: FakeHub, pki: Any, status: str, message: str) -> None:
    key = _enroll(hub, "box-x")
    hub.dps_outcomes["box-x"] = (status, 400209, message)
    with pytest.raises(DpsError) as err:
        register(
            id_scope=hub.id_scope,
            registration_id="box-x",
            symmetric_key=key,
            ca_file=str(pki["ca"]),
            connect_host="127.0.0.1",
            port=hub.port,
            timeout_s=30,
        )
    assert f"DPS registration {status}: {message}" in str(err.value) and "400209" in str(err.value)
