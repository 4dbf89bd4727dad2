"""The cloud agent against the fake IoT Hub over TLS: auth, renewal, twin, methods, C2D, bad input."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from appliance.cloud import crypto, outbox, payload
from appliance.cloud.agent import CloudAgent
from appliance.cloud.deid import load_or_create_device_secret
from testsupport.cloud import DEVICE, PHI_STRINGS, cloud_settings, sample_result
from testsupport.common import wait_until
from testsupport.fakehub import FakeHub

pytestmark = pytest.mark.integration


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
            mid, body = payload.build_result_message(
                sample_result(i + 1), agent.settings, secret, recipient_keys=agent.settings.cloud.recipient_keys
            )
            outbox.enqueue(conn, kind="result", message_id=mid, body=body)
            ids.append(mid)
    return ids


def test_sas_connect_d2c_properties_and_no_phi(make_agent, hub: FakeHub, central_keys) -> None:
    agent = make_agent()
    ids = _enqueue_results(agent, 3)
    agent.start()
    wait_until(lambda: len(hub.messages(DEVICE, "result")) == 3, timeout=20, what="3 results")
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
    wait_until(
        lambda: agent.store.query("SELECT COUNT(*) FROM outbox WHERE kind='result'")[0][0] == 0, timeout=20, what="sent"
    )
    wait_until(lambda: hub.twin(DEVICE)["reported"].get("software_version"), timeout=20, what="reported properties")
    rep = hub.twin(DEVICE)["reported"]
    assert {"outbox", "disk", "backend", "bundles_active", "software_version"} <= set(rep)


def _first_occurrences(ids: list[str]) -> list[str]:
    seen, out = set(), []
    for i in ids:
        if i not in seen:
            seen.add(i)
            out.append(i)
    return out


def test_x509_connect_and_wrong_identity_refused(make_agent, hub: FakeHub, pki, caplog) -> None:
    agent = make_agent(auth="x509")
    ids = _enqueue_results(agent, 2)
    agent.start()
    wait_until(lambda: len(hub.messages(DEVICE, "result")) == 2, timeout=20, what="results over X.509")
    assert [m.props["$.mid"] for m in hub.messages(DEVICE, "result")] == ids
    agent.stop()
    bad = make_agent(auth="x509", cert_file=str(pki["other_crt"]), key_file=str(pki["other_key"]))
    bad.start()
    wait_until(lambda: hub.events_for(DEVICE, "refused"), timeout=20, what="refusal")
    assert "CN='someone-else'" in hub.events_for(DEVICE, "refused")[-1].detail
    wait_until(lambda: "refused" in (bad.client.last_error or ""), timeout=20, what="client error")


def test_wrong_key_refused_and_clock_far_off_is_a_clear_error(make_agent, hub: FakeHub, caplog) -> None:
    clock = {"offset": -40 * 365 * 86400.0}  # RTC reset: 1985
    import time as _t

    agent = make_agent(time_fn=lambda: _t.time() + clock["offset"])
    agent.start()
    wait_until(lambda: hub.events_for(DEVICE, "refused"), timeout=20, what="expired token refused")
    assert "expired" in hub.events_for(DEVICE, "refused")[0].detail

    def logged(text: str) -> bool:
        return any(text in str(getattr(r, "fields", {})) for r in caplog.records)

    wait_until(
        lambda: "clock far off" in caplog.text and logged("system clock reads 19"),
        timeout=20,
        what="clock error logged",
    )
    assert logged("SAS token was rejected")
    assert agent.status()["outbox"]["depth"] >= 0  # agent alive
    clock["offset"] = 0.0  # NTP fixed the clock: the next attempt succeeds
    wait_until(lambda: agent.client.ready, timeout=20, what="connect after clock fix")


def test_sas_token_renewal_over_a_long_run(make_agent, hub: FakeHub) -> None:
    agent = make_agent(sas_ttl_s=5, sas_renew_fraction=0.3)  # a new token every 1.5 s
    agent.start()
    ids: list[str] = []
    for k in range(8):
        ids += _enqueue_results(agent, 25, start=k * 25)
        _t_sleep(0.6)
    wait_until(
        lambda: len({m.props["$.mid"] for m in hub.messages(DEVICE, "result")}) == 200, timeout=20, what="200 results"
    )
    got = [m.props["$.mid"] for m in hub.messages(DEVICE, "result")]
    assert _first_occurrences(got) == ids and len(got) == len(ids)  # in order, each once
    assert len(hub.events_for(DEVICE, "connected")) >= 3  # renewed by reconnecting
    assert not hub.events_for(DEVICE, "token-expired")  # never ran into expiry


def _t_sleep(s: float) -> None:
    import time as _t

    _t.sleep(s)


def test_twin_reconciled_after_patches_sent_while_offline(make_agent, hub: FakeHub) -> None:
    agent = make_agent()
    agent.start()
    wait_until(lambda: agent.twin.status.get("status") == "applied", timeout=20, what="initial twin")
    agent.stop()
    hub.update_desired(DEVICE, {"health_interval_s": 120})  # offline: not delivered
    v = hub.update_desired(DEVICE, {"upload_results": False, "log_level": "INFO"})
    agent2 = make_agent()
    agent2.start()
    wait_until(lambda: agent2.twin.version == v, timeout=20, what="twin GET on reconnect")
    assert agent2.health_interval_s == 120 and agent2.sender.upload_results is False
    wait_until(
        lambda: (hub.twin(DEVICE)["reported"].get("desired_status") or {}).get("version") == v,
        timeout=20,
        what="reported",
    )
    # a stale patch ($version not newer) is ignored, a newer one applied
    hub.send_raw_desired(DEVICE, json.dumps({"health_interval_s": 5, "$version": v}).encode(), v)
    v2 = hub.update_desired(DEVICE, {"upload_results": True})
    wait_until(lambda: agent2.twin.version == v2, timeout=20, what="live patch")
    assert agent2.health_interval_s == 120 and agent2.sender.upload_results is True


def test_bad_desired_properties_rejected_with_reason_nothing_applied(make_agent, hub: FakeHub) -> None:
    v = hub.update_desired(DEVICE, {"health_interval_s": 300})
    agent = make_agent()
    agent.start()
    wait_until(lambda: agent.twin.version == v, timeout=20, what="twin")
    cases = [
        (b"{not json", "not JSON"),
        (json.dumps({"x": "y" * 40000}).encode(), "32 KB"),
        (json.dumps({"health_interval_s": -5}).encode(), "health_interval_s"),
        (json.dumps({"open_all_ports": True}).encode(), "open_all_ports"),
        (json.dumps({"recipient_keys": {"k": "bm90LWEta2V5"}}).encode(), "cannot supply encryption keys"),
        (json.dumps({"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": {"j": {"k": 1}}}}}}}}}}}).encode(), "deeper"),
    ]
    for i, (body, reason) in enumerate(cases):
        vi = hub.send_raw_desired(DEVICE, body)
        wait_until(lambda vi=vi: agent.twin.status.get("version") == vi, timeout=20, what=f"case {i}")
        assert agent.twin.status["status"] == "rejected" and reason in agent.twin.status["reason"], agent.twin.status
        assert agent.health_interval_s == 300 and agent.overlay.current().recipient_keys.keys() == {"central-1"}
    wait_until(
        lambda: (hub.twin(DEVICE)["reported"].get("desired_status") or {}).get("status") == "rejected",
        timeout=20,
        what="rep",
    )
    assert agent.methods.dispatch("ping", b"")[0] == 200 and agent.client.ready  # still running
    # the service fixes its document: applied
    hub.update_desired(DEVICE, {"open_all_ports": None, "recipient_keys": None, "health_interval_s": 60})
    wait_until(lambda: agent.twin.status.get("status") == "applied", timeout=20, what="fixed twin applied")
    assert agent.health_interval_s == 60


def test_twin_settings_are_an_overlay_persisted_and_never_mutate_the_config(
    make_agent, hub: FakeHub, central_keys, tmp_path: Path
) -> None:
    """A signed recipient key set and the TTL from the twin reach the result publisher through the overlay; the
    config-file ``Settings`` are never changed; the overlay (with its $version) survives a restart before the hub
    is back."""
    from appliance.cloud import keysets
    from appliance.cloud.overlay import CloudOverlay
    from appliance.cloud.result_messages import CloudResultPublisher
    from engines import keys

    signing = keys.generate_private_key()
    trusted = {keys.key_id(signing): keys.public_key_b64(signing)}
    priv2, pub2 = crypto.generate_keypair()
    signed = keysets.sign(
        keysets.KeySet(version=1, issued_at=0, expires_at=int(time.time()) + 86400, keys={"central-2": pub2}), signing
    )
    agent = make_agent(keyset_trusted_keys=trusted)
    before = agent.settings.model_dump()
    agent.start()
    v = hub.update_desired(DEVICE, {"recipient_keyset": signed, "outbox_ttl_days": 3})
    wait_until(
        lambda: agent.twin.version == v and agent.twin.status.get("status") == "applied", timeout=20, what="overlay"
    )
    assert agent.settings.model_dump() == before  # the config file's settings are untouched
    eff = agent.overlay.current()
    assert eff.version == v and dict(eff.recipient_keys) == {"central-2": pub2} and eff.outbox_ttl_days == 3
    publisher = CloudResultPublisher(agent.settings, agent.overlay)
    msg = publisher.build(sample_result(1), 1)
    meta, _ = crypto.decrypt(msg.body, {"central-2": priv2})  # readable with the signed set's key ...
    assert meta["mid"] == msg.message_id
    with pytest.raises(crypto.DecryptError, match="no private key"):
        crypto.decrypt(msg.body, {"central-1": central_keys["priv"]})  # ... no longer with the config's
    with agent.store.transaction() as conn:
        assert publisher.enqueue(conn, msg)
    row = agent.store.query("SELECT created_at, expires_at FROM outbox WHERE message_id=?", (msg.message_id,))[0]
    assert row["expires_at"] - row["created_at"] == pytest.approx(3 * 86400)
    agent.stop()
    # a restart with the hub unreachable: the persisted overlay is in force from the start
    again = CloudOverlay(agent.settings.cloud, agent.store).current()
    assert again.version == v and dict(again.recipient_keys) == {"central-2": pub2}
    # the twin re-created in the hub (its $version starts again at 1): the full GET is authoritative
    with hub.lock:  # what a new device identity's twin holds
        hub.devices[DEVICE].desired.clear()
        hub.devices[DEVICE].desired_version = 1
    agent2 = make_agent(keyset_trusted_keys=trusted)
    agent2.start()
    wait_until(lambda: agent2.overlay.current().version == 1, timeout=20, what="re-created twin applied")
    assert dict(agent2.overlay.current().recipient_keys) == {"central-1": central_keys["pub"]}  # the config's


def test_twin_get_throttled_429_is_retried(make_agent, hub: FakeHub) -> None:
    hub.inject_twin_status(DEVICE, [429])
    v = hub.update_desired(DEVICE, {"health_interval_s": 77})
    agent = make_agent()
    agent.start()
    wait_until(lambda: agent.twin.version == v, timeout=15, what="twin after 429")
    assert agent.health_interval_s == 77


def test_direct_methods(make_agent, hub: FakeHub) -> None:
    calls = []

    def selftest(payload):
        calls.append(payload)
        return 200, {"passed": True}

    def broken(payload):
        raise RuntimeError("boom")

    agent = make_agent(method_hooks={"run_selftest": selftest, "resend": broken})
    _enqueue_results(agent, 1)
    agent.start()
    wait_until(lambda: agent.client.ready, timeout=20, what="ready")
    assert hub.invoke_method(DEVICE, "ping", {"n": 1})[0] == 200
    status, body = hub.invoke_method(DEVICE, "get_status")
    assert status == 200 and "outbox" in body and body["device_id"] == DEVICE and "studies" in body
    assert hub.invoke_method(DEVICE, "run_selftest", {"quick": True}) == (200, {"passed": True})
    assert calls == [{"quick": True}]
    assert hub.invoke_method(DEVICE, "rollback_model")[0] == 501
    assert hub.invoke_method(DEVICE, "resend")[0] == 500
    status, body = hub.invoke_method(DEVICE, "format_disk")
    assert status == 404 and "unknown method" in body["error"]
    status, body = hub.invoke_method(DEVICE, "ping", raw=b"\xff\xfe not json")
    assert status == 400 and "not JSON" in body["error"]
    assert hub.invoke_method(DEVICE, "ping", raw=json.dumps({"x": "y" * 200_000}).encode())[0] == 400  # hub limit
    assert agent.methods.dispatch("ping", b"x" * (129 * 1024))[0] == 413
    assert hub.invoke_method(DEVICE, "ping")[0] == 200  # still running
    agent.stop()
    # once the hub has seen the connection close (it may still be closing: a method then times out, 504)
    wait_until(lambda: not hub.is_connected(DEVICE), timeout=10, what="the hub sees the device offline")
    assert hub.invoke_method(DEVICE, "ping")[0] == 404  # offline device


def test_c2d_received_acked_and_bad_ones_rejected(make_agent, hub: FakeHub) -> None:
    got = []

    def on_c2d(props, body):
        if isinstance(body, dict) and body.get("reject"):
            raise ValueError("command not allowed")
        got.append((props.get("cmd"), body))

    agent = make_agent(c2d_hook=on_c2d)
    agent.start()
    wait_until(lambda: agent.client.ready, timeout=20, what="ready")
    hub.send_c2d(DEVICE, b'{"hello": 1}', {"cmd": "note"})
    wait_until(lambda: got == [("note", {"hello": 1})], timeout=20, what="c2d delivered")
    for body, reason in ((b"\x00garbage", "not JSON"), (b"x" * 70_000, "64 KB"), (b'{"reject": true}', "not allowed")):
        hub.send_raw_c2d(DEVICE, body)
        wait_until(
            lambda r=reason: agent.last_c2d and r in (agent.last_c2d.get("reason") or ""), timeout=20, what=reason
        )
    wait_until(lambda: len(hub.c2d_completed) == 4, timeout=20, what="all acknowledged")
    assert not hub.devices[DEVICE].c2d_queue
    wait_until(
        lambda: (hub.twin(DEVICE)["reported"].get("last_c2d") or {}).get("status") == "rejected",
        timeout=20,
        what="reported",
    )
    assert hub.invoke_method(DEVICE, "ping")[0] == 200


def test_c2d_sent_while_offline_is_delivered_on_reconnect(make_agent, hub: FakeHub) -> None:
    got = []
    agent = make_agent(c2d_hook=lambda p, b: got.append(b))
    agent.start()
    wait_until(lambda: agent.client.ready, timeout=20, what="ready")
    agent.stop()
    hub.send_c2d(DEVICE, b'{"n": 1}')
    agent2 = make_agent(c2d_hook=lambda p, b: got.append(b))
    agent2.start()
    wait_until(lambda: got == [{"n": 1}], timeout=20, what="queued C2D after reconnect (CleanSession=0)")


def test_broker_cut_mid_publish_resends_same_id(make_agent, hub: FakeHub) -> None:
    agent = make_agent()
    ids = _enqueue_results(agent, 50)
    hub.cut_after(DEVICE, 10, capture_last=True)  # 10th message reaches the hub, its PUBACK never comes back
    agent.start()
    wait_until(lambda: len({m.props["$.mid"] for m in hub.messages(DEVICE, "result")}) == 50, timeout=20, what="all 50")
    got = [m.props["$.mid"] for m in hub.messages(DEVICE, "result")]
    assert _first_occurrences(got) == ids
    assert ids[9] in got[10:]  # the cut one was re-sent with the same id
    assert len(hub.events_for(DEVICE, "connected")) >= 2
    wait_until(lambda: agent.status()["outbox"]["by_kind"].get("result", 0) == 0, timeout=20, what="outbox drained")


def test_1000_offline_results_then_hub_up_and_hub_killed_mid_stream(make_agent, hub: FakeHub) -> None:
    hub.stop()
    agent = make_agent()
    agent.start()  # hub down: the client backs off and retries
    ids = _enqueue_results(agent, 1000)
    _t_sleep(1.0)
    hub.start()
    wait_until(lambda: len(hub.messages(DEVICE, "result")) >= 300, timeout=20, what="first 300")
    hub.stop()  # killed mid-stream
    _t_sleep(0.5)
    hub.start()
    wait_until(lambda: len({m.props["$.mid"] for m in hub.messages(DEVICE, "result")}) == 1000, timeout=60, what="1000")
    got = [m.props["$.mid"] for m in hub.messages(DEVICE, "result")]
    assert _first_occurrences(got) == ids  # in order; duplicates only of ids already sent
    assert len(got) - 1000 <= agent.settings.cloud.max_inflight
    wait_until(lambda: agent.status()["outbox"]["by_kind"].get("result", 0) == 0, timeout=20, what="outbox drained")


def test_1000_offline_results_delivered_once_in_order(make_agent, hub: FakeHub) -> None:
    hub.stop()
    agent = make_agent()
    ids = _enqueue_results(agent, 1000)
    agent.start()
    _t_sleep(0.5)
    hub.start()
    wait_until(lambda: len(hub.messages(DEVICE, "result")) >= 1000, timeout=60, what="1000")
    wait_until(lambda: agent.status()["outbox"]["by_kind"].get("result", 0) == 0, timeout=20, what="outbox drained")
    got = [m.props["$.mid"] for m in hub.messages(DEVICE, "result")]
    assert got == ids  # each exactly once, in order


def test_out_of_range_versions_and_damaged_twin_rows_never_stop_the_agent(make_agent, hub: FakeHub) -> None:
    """A desired $version beyond 64 bits is refused without being adopted (later patches still apply), and
    cloud_state rows that cannot be read are forgotten at start instead of crashing the daemon."""
    agent = make_agent()
    agent.start()
    v = hub.update_desired(DEVICE, {"health_interval_s": 300})
    wait_until(lambda: agent.twin.version == v, timeout=20, what="twin")
    hub.send_raw_desired(DEVICE, json.dumps({"health_interval_s": 61, "$version": 10**23}).encode(), v + 1)
    wait_until(lambda: agent.twin.status.get("status") == "rejected", timeout=20, what="huge $version rejected")
    assert agent.twin.version == v and "64-bit" in agent.twin.status["reason"]
    v2 = hub.update_desired(DEVICE, {"health_interval_s": 62})
    # the overlay is in force a moment before TwinState records the version: wait for both (a race under load)
    wait_until(
        lambda: agent.health_interval_s == 62 and agent.twin.version == v2, timeout=20, what="the next patch applies"
    )
    agent.stop()
    for key, value in (("twin.desired_doc", "garbage"), ("twin.desired_version", "abc"), ("twin.desired_status", "[")):
        with agent.store.transaction() as conn:
            conn.execute("UPDATE cloud_state SET value=? WHERE key=?", (value, key))
    again = make_agent()  # reads the damaged rows
    assert again.twin.version == 0 and again.twin.doc == {}
    again.start()
    wait_until(lambda: again.twin.version == v2, timeout=20, what="the full twin GET restores the document")
    assert again.health_interval_s == 62
