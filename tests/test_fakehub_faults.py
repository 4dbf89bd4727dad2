"""The fake hub's fault injection (drop, delay, throttle chosen messages) and DPS SAS tokens without ``skn``.

Raw paho clients (as in tests/test_fakehub.py) see exactly what the hub sends; the clients under test
(the appliance's own, Microsoft's SDK) are exercised against these faults elsewhere.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from appliance.cloud import sas
from tests.test_fakehub import Raw
from testsupport.cloud import DEVICE, HUB
from testsupport.common import wait_until
from testsupport.fakehub import FakeHub

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _close_raw_clients(hub: FakeHub) -> Iterator[None]:
    yield
    for r in Raw.opened:
        r.c.disconnect()
    while Raw.opened:
        Raw.opened.pop().c.loop_stop()


def _device(hub: FakeHub, pki, key: str) -> Raw:
    token, _ = sas.device_token(HUB, DEVICE, key, 60)
    r = Raw(hub.port, pki["ca"], DEVICE, sas.username(HUB, DEVICE), token)
    got = []
    r.c.on_subscribe = lambda c, u, mid, codes, p: got.append(mid)
    r.c.subscribe([("$iothub/twin/res/#", 1), ("$iothub/twin/PATCH/properties/desired/#", 1)])
    wait_until(lambda: got, 10, "SUBACK")
    return r


def test_dropped_desired_patch_never_arrives_next_one_does_with_version_gap(hub: FakeHub, pki, device_key) -> None:
    r = _device(hub, pki, device_key)
    fault = hub.add_fault("$iothub/twin/PATCH/properties/desired/*", "drop", count=1)
    lost = hub.update_desired(DEVICE, {"a": 1})
    kept = hub.update_desired(DEVICE, {"b": 2})
    wait_until(lambda: r.msgs, 10, "the second patch")
    assert fault.hits == [f"$iothub/twin/PATCH/properties/desired/?$version={lost}"]
    assert [t for t, _ in r.msgs] == [f"$iothub/twin/PATCH/properties/desired/?$version={kept}"]
    assert kept == lost + 1  # the device sees $version jump by two: the sign of a lost patch
    assert hub.twin(DEVICE)["desired"]["a"] == 1  # lost on the wire only: the twin has it (a full GET shows it)
    assert [e.detail for e in hub.events_for(DEVICE, "fault-drop")] == fault.hits


def test_dropped_twin_response_then_answered_on_retry(hub: FakeHub, pki, device_key) -> None:
    r = _device(hub, pki, device_key)
    fault = hub.add_fault("$iothub/twin/res/*", "drop", count=1, device_id=DEVICE)
    r.c.publish("$iothub/twin/GET/?$rid=1", b"", qos=1)
    wait_until(lambda: fault.hits, 10, "the response to be dropped")
    time.sleep(0.5)
    assert r.msgs == []  # the GET's response never comes
    r.c.publish("$iothub/twin/GET/?$rid=2", b"", qos=1)
    wait_until(lambda: r.msgs, 10, "the retried GET's response")
    assert r.msgs[0][0] == "$iothub/twin/res/200/?$rid=2"


def test_dropped_request_from_device_has_no_effect(hub: FakeHub, pki, device_key) -> None:
    r = _device(hub, pki, device_key)
    fault = hub.add_fault("$iothub/twin/PATCH/properties/reported/*", "drop", direction="from_device", count=1)
    r.c.publish("$iothub/twin/PATCH/properties/reported/?$rid=1", json.dumps({"x": 1}), qos=1)
    r.c.publish("$iothub/twin/PATCH/properties/reported/?$rid=2", json.dumps({"y": 2}), qos=1)
    wait_until(lambda: r.msgs, 10, "the second reported patch's response")
    assert [t.split("&")[0] for t, _ in r.msgs] == ["$iothub/twin/res/204/?$rid=2"]
    assert len(fault.hits) == 1
    reported = hub.twin(DEVICE)["reported"]
    assert "x" not in reported and reported["y"] == 2


def test_delayed_method_request_answered_after_the_delay(hub: FakeHub, pki, device_key) -> None:
    r = _device(hub, pki, device_key)
    got = []
    r.c.on_subscribe = lambda c, u, mid, codes, p: got.append(mid)
    r.c.subscribe("$iothub/methods/POST/#", 1)
    wait_until(lambda: got, 10, "SUBACK")

    def answer(c, u, m) -> None:
        r.msgs.append((m.topic, m.payload))
        if m.topic.startswith("$iothub/methods/POST/"):
            rid = m.topic.split("$rid=")[1]
            c.publish(f"$iothub/methods/res/200/?$rid={rid}", json.dumps({"at": time.monotonic()}), qos=1)

    r.c.on_message = answer
    hub.add_fault("$iothub/methods/POST/ping/*", "delay", delay_s=1.5)
    start = time.monotonic()
    status, payload = hub.invoke_method(DEVICE, "ping", {}, timeout=30)
    assert status == 200
    assert payload["at"] - start >= 1.5  # the device got the request only after the injected delay


def test_throttled_twin_get_gets_429_then_200(hub: FakeHub, pki, device_key) -> None:
    r = _device(hub, pki, device_key)
    hub.add_fault("$iothub/twin/GET/*", "throttle", direction="from_device", count=2)
    for rid in (1, 2, 3):
        r.c.publish(f"$iothub/twin/GET/?$rid={rid}", b"", qos=1)
    wait_until(lambda: len(r.msgs) == 3, 10, "three responses")
    assert sorted(t for t, _ in r.msgs) == [
        "$iothub/twin/res/200/?$rid=3",
        "$iothub/twin/res/429/?$rid=1",
        "$iothub/twin/res/429/?$rid=2",
    ]


def test_fault_arguments_checked(hub: FakeHub) -> None:
    with pytest.raises(ValueError, match="from_device"):
        hub.add_fault("$iothub/twin/res/*", "throttle")
    with pytest.raises(ValueError, match="delay_s"):
        hub.add_fault("$iothub/twin/res/*", "delay")
    with pytest.raises(ValueError, match="unknown fault"):
        hub.add_fault("$iothub/twin/res/*", "corrupt")


def _dps(hub: FakeHub, pki, reg: str, token: str) -> Raw:
    return Raw(hub.port, pki["ca"], reg, f"{hub.id_scope}/registrations/{reg}/api-version=2019-03-31", token)


def test_dps_accepts_token_without_skn_refuses_other_skn_and_throttles_with_retry_after(hub: FakeHub, pki) -> None:
    group_key = "Z3JvdXAta2V5LWZvci10ZXN0cy0zMi1ieXRlcy1sb25nISE="
    hub.add_enrollment_group("clinics", group_key)
    reg = "clinic-0100"
    key = sas.derive_device_key(group_key, reg)
    uri, exp = f"{hub.id_scope}/registrations/{reg}", int(time.time()) + 60
    assert _dps(hub, pki, reg, sas.generate_sas_token(uri, key, exp, "someone")).rc == 5
    r = _dps(hub, pki, reg, sas.generate_sas_token(uri, key, exp))  # no skn, as Azure's C SDK may send
    assert r.rc == 0
    got = []
    r.c.on_subscribe = lambda c, u, mid, codes, p: got.append(mid)
    r.c.subscribe("$dps/registrations/res/#", 1)
    wait_until(lambda: got, 10, "SUBACK")
    hub.add_fault("$dps/registrations/PUT/*", "throttle", direction="from_device", retry_after_s=3)
    body = json.dumps({"registrationId": reg})
    r.c.publish("$dps/registrations/PUT/iotdps-register/?$rid=1", body, qos=1)
    wait_until(lambda: r.msgs, 10, "429")
    assert r.msgs[0][0] == "$dps/registrations/res/429/?$rid=1&retry-after=3"
    r.c.publish("$dps/registrations/PUT/iotdps-register/?$rid=2", body, qos=1)
    wait_until(lambda: len(r.msgs) == 2, 10, "202")
    assert r.msgs[1][0].startswith("$dps/registrations/res/202/?$rid=2")
