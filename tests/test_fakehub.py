"""The fake hub rejects what IoT Hub rejects (per Microsoft's MQTT docs), tested with a raw paho client."""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from appliance.cloud import sas
from testsupport.cloud import DEVICE, HUB
from testsupport.common import wait_until
from testsupport.fakehub import FakeHub

pytestmark = pytest.mark.integration


class Raw:
    """A bare paho connection with the hub's username rules, to poke at the fake hub."""

    opened: list[Raw] = []  # closed after each test (before its hub stops): no paho thread lives on, reconnecting

    def __init__(self, port: int, ca: Path, client_id: str, username: str, password: str | None, cert=None):
        Raw.opened.append(self)
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        ctx = ssl.create_default_context(cafile=str(ca))
        if cert:
            ctx.load_cert_chain(*cert)
        self.c.tls_set_context(ctx)
        self.c.username_pw_set(username, password)
        self.rc: int | None = None
        self.disconnected = threading.Event()
        self.msgs: list[tuple[str, bytes]] = []
        # paho reports MQTT 3.1.1 CONNACK codes as MQTT 5 reason codes; map them back
        v5_to_311 = {0: 0, 132: 1, 133: 2, 136: 3, 134: 4, 135: 5}
        self.c.on_connect = lambda c, u, f, rc, p: setattr(self, "rc", v5_to_311.get(rc.value, rc.value))
        self.c.on_disconnect = lambda c, u, f, rc, p: self.disconnected.set()
        self.c.on_message = lambda c, u, m: self.msgs.append((m.topic, m.payload))
        self.c.connect("127.0.0.1", port, 30)
        self.c.loop_start()
        wait_until(lambda: self.rc is not None, 5, "CONNACK")

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture(autouse=True)
def _close_raw_clients(hub: FakeHub) -> Iterator[None]:
    yield
    for r in Raw.opened:  # all at once: each paho thread may sit up to 1 s in its reconnect wait
        r.c.disconnect()
    while Raw.opened:
        Raw.opened.pop().c.loop_stop()


def _raw(hub: FakeHub, pki, key: str, ttl: int = 60, **kw) -> Raw:
    token, _ = sas.device_token(HUB, DEVICE, key, ttl)
    args = {"client_id": DEVICE, "username": sas.username(HUB, DEVICE), "password": token}
    args.update(kw)
    return Raw(hub.port, pki["ca"], **args)


def test_connect_rules(hub: FakeHub, pki, device_key: str) -> None:
    assert _raw(hub, pki, device_key).rc == 0
    wrong_key = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3ODk="
    assert _raw(hub, pki, wrong_key).rc == 5
    assert "signature" in hub.events_for(DEVICE, "refused")[-1].detail
    assert _raw(hub, pki, device_key, ttl=-10).rc == 5
    assert "expired" in hub.events_for(DEVICE, "refused")[-1].detail
    assert _raw(hub, pki, device_key, client_id="other-id").rc == 2  # client id must be the device id
    assert _raw(hub, pki, device_key, username=f"{HUB}/{DEVICE}").rc == 4  # no api-version
    assert _raw(hub, pki, device_key, password=None).rc == 5  # neither SAS nor certificate
    ok = _raw(hub, pki, device_key, password=None, cert=(str(pki["device_crt"]), str(pki["device_key"])))
    assert ok.rc == 0  # X.509: CN = device id


def test_token_expiry_disconnects_a_live_connection(hub: FakeHub, pki, device_key: str) -> None:
    r = _raw(hub, pki, device_key, ttl=2)
    assert r.rc == 0
    assert r.disconnected.wait(6)
    assert hub.events_for(DEVICE, "token-expired")


@pytest.mark.parametrize(
    "action,reason",
    [
        (lambda c: c.publish(f"devices/{DEVICE}/messages/events/", b"x", qos=2), "QoS 2"),
        (lambda c: c.publish("devices/other-device/messages/events/", b"x", qos=1), "foreign topic"),
        (lambda c: c.publish("some/random/topic", b"x", qos=0), "undocumented"),
        (lambda c: c.subscribe("devices/other-device/messages/devicebound/#", 1), "undocumented"),
        (lambda c: c.publish(f"devices/{DEVICE}/messages/events/", b"x" * (256 * 1024 + 10), qos=1), "256 KB"),
    ],
)
def test_forbidden_operations_close_the_connection(hub: FakeHub, pki, device_key: str, action, reason: str) -> None:
    r = _raw(hub, pki, device_key)
    action(r.c)
    assert r.disconnected.wait(5)
    assert reason in hub.events_for(DEVICE, "disconnected")[0].detail
    r.c.loop_stop()


def test_twin_get_patch_versions_and_qos2_subscribe_granted_as_1(hub: FakeHub, pki, device_key: str) -> None:
    r = _raw(hub, pki, device_key)
    granted = []
    r.c.on_subscribe = lambda c, u, mid, codes, p: granted.extend(x.value for x in codes)
    r.c.subscribe([("$iothub/twin/res/#", 2), ("$iothub/twin/PATCH/properties/desired/#", 0)])
    wait_until(lambda: granted, 5, "SUBACK")
    assert granted == [1, 0]
    r.c.publish("$iothub/twin/PATCH/properties/reported/?$rid=7", json.dumps({"fw": "1.0"}))
    r.c.publish("$iothub/twin/PATCH/properties/reported/?$rid=8", json.dumps({"bad.key": 1}))
    r.c.publish("$iothub/twin/GET/?$rid=9", b"")
    wait_until(lambda: len(r.msgs) == 3, 5, "twin replies")
    topics = [t for t, _ in r.msgs]
    assert topics[0].startswith("$iothub/twin/res/204/?$rid=7&$version=")
    assert topics[1].startswith("$iothub/twin/res/400/?$rid=8")
    assert topics[2] == "$iothub/twin/res/200/?$rid=9"
    twin = json.loads(r.msgs[2][1])
    assert twin["reported"]["fw"] == "1.0" and isinstance(twin["desired"]["$version"], int)
    v = hub.update_desired(DEVICE, {"a": 1})
    wait_until(lambda: len(r.msgs) == 4, 5, "desired patch")
    assert r.msgs[3][0] == f"$iothub/twin/PATCH/properties/desired/?$version={v}"
    assert json.loads(r.msgs[3][1]) == {"a": 1, "$version": v}
    r.close()


def test_dps_register_and_poll_then_connect_to_assigned_hub(hub: FakeHub, pki) -> None:
    group_key = "Z3JvdXAta2V5LWZvci10ZXN0cy0zMi1ieXRlcy1sb25nISE="
    hub.add_enrollment_group("clinics", group_key)
    reg = "clinic-0099"
    dev_key = sas.derive_device_key(group_key, reg)
    token = sas.generate_sas_token(
        f"{hub.id_scope}/registrations/{reg}", dev_key, int(time.time()) + 60, "registration"
    )
    r = Raw(hub.port, pki["ca"], reg, f"{hub.id_scope}/registrations/{reg}/api-version=2019-03-31", token)
    assert r.rc == 0
    r.c.subscribe("$dps/registrations/res/#", 1)
    time.sleep(0.2)
    r.c.publish(
        "$dps/registrations/PUT/iotdps-register/?$rid=1",
        json.dumps({"registrationId": reg, "payload": {"site": "x"}}),
        qos=1,
    )
    wait_until(lambda: r.msgs, 5, "202")
    assert r.msgs[0][0].startswith("$dps/registrations/res/202/?$rid=1&retry-after=")
    op = json.loads(r.msgs[0][1])["operationId"]
    status = None
    for rid in range(2, 6):
        r.c.publish(f"$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={op}", b"", qos=1)
        wait_until(lambda rid=rid: len(r.msgs) == rid, 5, "poll reply")
        status = json.loads(r.msgs[-1][1])
        if status["status"] == "assigned":
            break
    assert status and status["registrationState"]["assignedHub"] == HUB
    assert status["registrationState"]["payload"] == {"received": {"site": "x"}}
    r.close()
    token2, _ = sas.device_token(HUB, reg, dev_key, 60)
    assert Raw(hub.port, pki["ca"], reg, sas.username(HUB, reg), token2).rc == 0  # the provisioned device connects
    bad = sas.generate_sas_token(
        f"{hub.id_scope}/registrations/{reg}", group_key, int(time.time()) + 60, "registration"
    )
    assert Raw(hub.port, pki["ca"], reg, f"{hub.id_scope}/registrations/{reg}/api-version=2019-03-31", bad).rc == 5


def test_the_hub_stamps_the_sender_identity_and_a_device_cannot_forge_it(hub: FakeHub, pki, device_key: str) -> None:
    """``iothub-connection-device-id`` comes from the authenticated connection; a device that sends its own
    ``iothub-*`` properties does not get them kept (Microsoft: system properties are set by the hub)."""
    raw = _raw(hub, pki, device_key)
    bag = "$.mid=m-1&type=result&iothub-connection-device-id=someone-else&IoTHub-Connection-Auth-Method=x"
    raw.c.publish(f"devices/{DEVICE}/messages/events/{bag}", b'{"v":1}', qos=1).wait_for_publish(10)
    (msg,) = wait_until(lambda: hub.messages(DEVICE), 10, "message")
    assert msg.system["iothub-connection-device-id"] == DEVICE
    assert json.loads(msg.system["iothub-connection-auth-method"])["type"] == "sas"
    assert not any(k.lower().startswith("iothub-") for k in msg.props) and msg.props["$.mid"] == "m-1"
    event = msg.event()
    assert event["system_properties"]["iothub-connection-device-id"] == DEVICE and event["body"] == '{"v":1}'
