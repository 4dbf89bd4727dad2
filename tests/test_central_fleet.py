"""Rollouts and fleet status through the fake hub's service API, with Microsoft's SDKs as peers.

Devices are ``azure-iot-device`` clients (Microsoft's device SDK, in its own venv) connected over MQTT/TLS;
the service side is ``appliance central rollout|status`` (subprocesses) and Microsoft's ``azure-iot-hub``
service SDK, both over HTTPS to the same fake hub.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.updates import layout
from testsupport.bundles import make_bundle, new_key, trust_for
from testsupport.cloud import HUB
from testsupport.common import PYTHON, ROOT, wait_until
from testsupport.daemon import daemon_env
from testsupport.fakehub import FakeHub
from testsupport.sdk import SdkDevice, sdk_python
from testsupport.tufrepo import make_repository

pytestmark = pytest.mark.integration
DEVICES = ("clinic-a", "clinic-b", "clinic-c")


@pytest.fixture
def fleet(pki: dict[str, Path]) -> Iterator[tuple[FakeHub, dict[str, str]]]:
    """A fake hub with three SAS devices tagged clinic=north, south, south."""
    hub = FakeHub(HUB, str(pki["server_crt"]), str(pki["server_key"]), str(pki["ca"]))
    keys = {d: base64.b64encode(os.urandom(32)).decode() for d in DEVICES}
    for d, clinic in zip(DEVICES, ("north", "south", "south"), strict=True):
        hub.add_device(d, key=keys[d])
        hub.set_tags(d, {"clinic": clinic})
    with hub:
        yield hub, keys


def central(hub: FakeHub, pki: dict[str, Path], *args: str, conn: str | None = None) -> subprocess.CompletedProcess:
    """``appliance central ARGS`` against ``hub``'s service API (connection string and CA from the environment)."""
    env = daemon_env(
        {
            "IOTHUB_CONNECTION_STRING": conn or hub.service_connection_string(),
            "APPLIANCE_CENTRAL_CA_FILE": str(pki["ca"]),
            "COLUMNS": "200",
        }
    )
    return subprocess.run(
        [PYTHON, "-m", "appliance", "central", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def device(hub: FakeHub, keys: dict[str, str], pki: dict[str, Path], dev: str) -> SdkDevice:
    if sdk_python() is None:
        pytest.fail("azure-iot-device venv missing: run ./bootstrap.sh test (it makes .venv-sdk)")
    d = SdkDevice(f"HostName={HUB};DeviceId={dev};SharedAccessKey={keys[dev]}", hub.port, pki["ca"])
    d.wait_for("connected")
    return d


def desired_updates(hub: FakeHub, dev: str) -> dict:
    return hub.twin(dev)["desired"].get(layout.DESIRED_KEY, {})


def test_service_sdk_sets_desired_device_sdk_receives_and_reports(fleet, pki, monkeypatch) -> None:
    """Microsoft's two SDKs, one on each side of the fake hub: twin update with etag, patch delivered, report read."""
    from azure.iot.hub import IoTHubRegistryManager
    from azure.iot.hub.models import Twin, TwinProperties
    from msrest.exceptions import HttpOperationError

    hub, keys = fleet
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki["ca"]))
    registry = IoTHubRegistryManager.from_connection_string(hub.service_connection_string("service"))
    with device(hub, keys, pki, "clinic-a") as dev:
        twin = registry.get_twin("clinic-a")
        assert twin.tags == {"clinic": "north"}
        want = {layout.DESIRED_KEY: {"bundles": {"cxr": {"version": "1.1.0"}}, "policy": {"health_studies": 2}}}
        updated = registry.update_twin("clinic-a", Twin(properties=TwinProperties(desired=want)), twin.etag)
        assert updated.properties.desired["$version"] == twin.properties.desired["$version"] + 1
        got = dev.wait_for("desired")["patch"]
        assert got[layout.DESIRED_KEY] == want[layout.DESIRED_KEY]
        assert got["$version"] == updated.properties.desired["$version"]
        # a stale etag is refused (412) and changes nothing
        with pytest.raises(HttpOperationError, match="Precondition Failed"):
            registry.update_twin("clinic-a", Twin(tags={"clinic": "east"}), twin.etag)
        assert registry.get_twin("clinic-a").tags == {"clinic": "north"}
        report = {layout.REPORTED_KEY: {"cxr": {"state": "downloading", "version": "1.1.0", "bytes": 10}}}
        dev.send(cmd="report", patch=report)
        dev.wait_for("reported")
        reported = registry.get_twin("clinic-a").properties.reported
        assert reported[layout.REPORTED_KEY] == report[layout.REPORTED_KEY]
        dev.send(cmd="get_twin")
        seen = dev.wait_for("twin")["twin"]
        assert seen["desired"][layout.DESIRED_KEY] == want[layout.DESIRED_KEY]


def _desired_patch_naming_updates(dev: Any) -> dict[str, Any]:
    """The next desired patch that names ``model_updates`` (a device started in a module-wide fleet may first
    get a patch left from an earlier test, which does not)."""
    while True:
        patch = dev.wait_for("desired")["patch"]
        if layout.DESIRED_KEY in patch:
            return patch


def test_cli_rollout_to_two_devices_then_status_from_reported(fleet, pki) -> None:
    hub, keys = fleet
    with device(hub, keys, pki, "clinic-a") as a, device(hub, keys, pki, "clinic-b") as b:
        for d in (a, b):
            d.send(cmd="echo_updates")
            d.wait_for("echoing")
        before = {d: hub.twin(d)["desired"]["$version"] for d in DEVICES}
        r = central(
            hub,
            pki,
            "rollout",
            "--bundle",
            "cxr",
            "--version",
            "1.1.0",
            "--device",
            "clinic-a",
            "--device",
            "clinic-b",
            "--window",
            "22:00-05:00",
            "--health-studies",
            "3",
            "--health-deadline-s",
            "7200",
        )
        assert r.returncode == 0, r.stderr
        lines = [json.loads(x) for x in r.stdout.splitlines()]
        assert [(x["device_id"], x["error"]) for x in lines] == [("clinic-a", None), ("clinic-b", None)]
        expected = {
            "bundles": {"cxr": {"version": "1.1.0"}},
            "policy": {"window": "22:00-05:00", "health_studies": 3, "health_deadline_s": 7200.0},
        }
        for d, dev in (("clinic-a", a), ("clinic-b", b)):
            assert desired_updates(hub, d) == expected
            assert hub.twin(d)["desired"]["$version"] == before[d] + 1
            assert _desired_patch_naming_updates(dev)[layout.DESIRED_KEY] == expected
            dev.wait_for("reported")
        assert hub.twin("clinic-c")["desired"]["$version"] == before["clinic-c"]  # not chosen: untouched
        wait_until(lambda: all(layout.REPORTED_KEY in hub.twin(d)["reported"] for d in ("clinic-a", "clinic-b")), 30)
        st = central(hub, pki, "status", "--json")
        assert st.returncode == 0, st.stderr
        rows = {(x["device_id"], x["bundle_id"]): x for x in map(json.loads, st.stdout.splitlines())}
        assert set(rows) == {("clinic-a", "cxr"), ("clinic-b", "cxr"), ("clinic-c", None)}
        for d in ("clinic-a", "clinic-b"):
            row = rows[(d, "cxr")]
            assert (row["connection"], row["desired"], row["state"], row["version"]) == (
                "Connected",
                "1.1.0",
                "waiting_window",
                "1.1.0",
            )
        assert rows[("clinic-c", None)]["state"] is None and rows[("clinic-c", None)]["connection"] == "Disconnected"
        table = central(hub, pki, "status")
        assert table.returncode == 0, table.stderr
        body = [ln for ln in table.stdout.splitlines() if "clinic-" in ln]
        assert len(body) == 3
        assert all("waiting_window" in ln and "1.1.0" in ln for ln in body if "clinic-c" not in ln)


def test_status_survives_hostile_reported_properties(fleet, pki) -> None:
    """Reported properties are written by the devices: one compromised box reports console markup, terminal
    escape sequences (clear screen, set the window title, move up and erase a line: hiding another device's
    row) and values of the wrong JSON type. ``central status`` still lists every device, shows the text
    literally with control characters escaped, and ``--json`` gives the odd values as JSON text."""
    hub, keys = fleet
    evil = "[/bold][link=http://e/]x[/link]\x1b[2J\x1b]0;t\x07"
    with device(hub, keys, pki, "clinic-a") as a, device(hub, keys, pki, "clinic-b") as b:
        a.send(
            cmd="report",
            patch={layout.REPORTED_KEY: {"cxr": {"state": "failed", "reason": evil, "since": "\x1b[1A\x1b[2K"}}},
        )
        a.wait_for("reported")
        b.send(
            cmd="report",
            patch={
                layout.REPORTED_KEY: {
                    "cxr": {"state": ["x"], "bytes": "lots", "total": {"n": 1}, "reason": 7},
                    "mmg": "?",
                }
            },
        )
        b.wait_for("reported")
        table = central(hub, pki, "status")
        assert table.returncode == 0, table.stderr
        out = table.stdout
        assert "\x1b" not in out and "\x07" not in out
        assert "[/bold][link=http://e/]x[/link]" in out and "\\x1b[2J" in out and "\\x07" in out
        assert sum(f"clinic-{c}" in out for c in "abc") == 3
        st = central(hub, pki, "status", "--json")
        assert st.returncode == 0, st.stderr
        rows = {(x["device_id"], x["bundle_id"]): x for x in map(json.loads, st.stdout.splitlines())}
        assert rows[("clinic-a", "cxr")]["reason"] == evil
        odd = rows[("clinic-b", "cxr")]
        assert (odd["state"], odd["bytes"], odd["total"], odd["reason"]) == ('["x"]', None, None, "7")
        assert rows[("clinic-b", "mmg")]["state"] is None


def test_rollout_by_tag_query_selects_only_tagged_devices(fleet, pki, monkeypatch) -> None:
    hub, _ = fleet
    r = central(
        hub, pki, "rollout", "--bundle", "mammo", "--version", "2.0.0", "--query",
        "SELECT * FROM devices WHERE tags.clinic = 'south'",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert sorted(json.loads(x)["device_id"] for x in r.stdout.splitlines()) == ["clinic-b", "clinic-c"]
    assert desired_updates(hub, "clinic-a") == {}
    for d in ("clinic-b", "clinic-c"):
        assert desired_updates(hub, d) == {"bundles": {"mammo": {"version": "2.0.0"}}}
    # a second bundle merges in, the first stays (a twin PATCH merges)
    r = central(hub, pki, "rollout", "--bundle", "cxr", "--version", "1.0.0", "--device", "clinic-b", "--any-time")
    assert r.returncode == 0, r.stderr
    assert desired_updates(hub, "clinic-b")["bundles"] == {
        "mammo": {"version": "2.0.0"},
        "cxr": {"version": "1.0.0"},
    }
    # the same query through Microsoft's service SDK selects the same devices (the fake hub's query is honest)
    from azure.iot.hub import IoTHubRegistryManager
    from azure.iot.hub.models import QuerySpecification

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki["ca"]))
    registry = IoTHubRegistryManager.from_connection_string(hub.service_connection_string())
    res = registry.query_iot_hub(
        QuerySpecification(
            query="SELECT * FROM devices WHERE properties.desired.model_updates.bundles.mammo.version = '2.0.0'"
        )
    )
    assert sorted(t.device_id for t in res.items) == ["clinic-b", "clinic-c"]
    page = registry.query_iot_hub(QuerySpecification(query="SELECT * FROM devices"), None, 2)
    assert [t.device_id for t in page.items] == ["clinic-a", "clinic-b"] and page.continuation_token
    rest = registry.query_iot_hub(QuerySpecification(query="SELECT * FROM devices"), page.continuation_token, 2)
    assert [t.device_id for t in rest.items] == ["clinic-c"]


def test_rollout_bad_input_refused_and_twins_untouched(fleet, pki, tmp_path: Path) -> None:
    hub, keys = fleet
    versions = {d: hub.twin(d)["desired"]["$version"] for d in DEVICES}
    bad = [
        (["--bundle", "cxr", "--version", "1.x", "--device", "clinic-a"], 2, "not a semantic version"),
        (["--bundle", "../etc", "--version", "1.0.0", "--device", "clinic-a"], 2, "not a valid bundle id"),
        (["--bundle", "cxr", "--version", "1.0.0", "--device", "clinic-a", "--window", "25:00-01:00"], 2, "window"),
        (["--bundle", "cxr", "--version", "1.0.0"], 2, "--device or select them with --query"),
        (["--bundle", "cxr", "--version", "1.0.0", "--query", "SELECT deviceId FROM devices"], 1, "SELECT *"),
    ]
    for args, rc, msg in bad:
        r = central(hub, pki, "rollout", *args)
        assert r.returncode == rc and msg in r.stderr, (args, r.returncode, r.stderr)
    # a version the repository never published (the director must not name what does not exist)
    key = new_key()
    h = make_repository(tmp_path, [make_bundle(tmp_path, key, bundle_id="cxr", version="1.0.0")], trust=trust_for(key))
    r = central(
        hub, pki, "rollout", "--bundle", "cxr", "--version", "9.9.9", "--device", "clinic-a", "--repo", str(h.repo_dir)
    )
    assert r.returncode == 1 and "cxr 9.9.9 is not published" in r.stderr
    # the wrong key, a device connection string, an unknown device
    wrong = (
        f"HostName=127.0.0.1:{hub.service_port};SharedAccessKeyName=iothubowner;"
        f"SharedAccessKey={base64.b64encode(b'x' * 32).decode()}"
    )
    r = central(hub, pki, "rollout", "--bundle", "cxr", "--version", "1.0.0", "--device", "clinic-a", conn=wrong)
    assert r.returncode == 1 and "401" in r.stdout + r.stderr
    devcs = f"HostName={HUB};DeviceId=clinic-a;SharedAccessKey={keys['clinic-a']}"
    r = central(hub, pki, "status", conn=devcs)
    assert r.returncode == 2 and "lacks SharedAccessKeyName" in r.stderr
    assert all(hub.twin(d)["desired"]["$version"] == versions[d] for d in DEVICES)
    r = central(
        hub, pki, "rollout", "--bundle", "cxr", "--version", "1.0.0", "--device", "ghost", "--device", "clinic-a"
    )
    assert r.returncode == 1
    out = {x["device_id"]: x for x in map(json.loads, r.stdout.splitlines())}
    assert "404" in out["ghost"]["error"] and out["clinic-a"]["error"] is None
    assert desired_updates(hub, "clinic-a") == {"bundles": {"cxr": {"version": "1.0.0"}}}


def test_direct_method_and_twin_replace_through_service_api(fleet, pki, monkeypatch) -> None:
    from azure.iot.hub import IoTHubRegistryManager
    from azure.iot.hub.models import CloudToDeviceMethod, Twin, TwinProperties

    from appliance.central.hub_service import ConnectionString, HubService, HubServiceError

    hub, keys = fleet
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki["ca"]))
    registry = IoTHubRegistryManager.from_connection_string(hub.service_connection_string())
    ours = HubService(ConnectionString.parse(hub.service_connection_string("service")), ca_file=str(pki["ca"]))
    with device(hub, keys, pki, "clinic-a") as dev:
        res = registry.invoke_device_method(
            "clinic-a", CloudToDeviceMethod(method_name="echo", payload={"n": 1}, response_timeout_in_seconds=10)
        )
        assert (res.status, res.payload) == (200, {"echo": {"n": 1}})
        assert dev.wait_for("method") == {"event": "method", "name": "echo", "payload": {"n": 1}}
        assert ours.invoke_method("clinic-a", "echo", [1, 2], timeout_s=10) == {
            "status": 200,
            "payload": {"echo": [1, 2]},
        }
        # PUT replaces desired: the device is sent the patch from the old document to the new one
        registry.update_twin("clinic-a", Twin(properties=TwinProperties(desired={"a": 1, "b": 2})), "*")
        assert dev.wait_for("desired")["patch"] == {
            "a": 1,
            "b": 2,
            "$version": hub.twin("clinic-a")["desired"]["$version"],
        }
        registry.replace_twin("clinic-a", Twin(tags={"clinic": "north"}, properties=TwinProperties(desired={"b": 3})))
        got = dev.wait_for("desired")["patch"]
        assert {k: v for k, v in got.items() if k != "$version"} == {"a": None, "b": 3}
        assert hub.twin("clinic-a")["desired"] == {"b": 3, "$version": got["$version"]}
    with pytest.raises(HubServiceError) as offline:
        ours.invoke_method("clinic-b", "echo", None, timeout_s=5)
    assert offline.value.status == 404 and "DeviceNotOnline" in str(offline.value)
    with pytest.raises(HubServiceError) as too_big:
        ours.update_twin("clinic-b", {"properties": {"desired": {"blob": "x" * 33 * 1024}}})
    assert too_big.value.status == 400 and "over 32 KB" in str(too_big.value)
    with pytest.raises(HubServiceError) as reported:
        ours.update_twin("clinic-b", {"properties": {"reported": {"x": 1}}})
    assert reported.value.status == 400 and "read-only" in str(reported.value)


def _raw_service(
    hub: FakeHub, pki: dict[str, Path], method: str, path: str, body: bytes, **headers: str
) -> tuple[int, Any]:
    """One raw HTTPS request to the fake hub's service API, signed as the service: (status, JSON body or None).
    A status of 0 means the connection closed without an answer."""
    import http.client
    import ssl
    import time

    from appliance.cloud.sas import API_VERSION, generate_sas_token

    host = f"127.0.0.1:{hub.service_port}"
    key = hub.service_policies["iothubowner"]
    conn = http.client.HTTPSConnection(
        "127.0.0.1", hub.service_port, timeout=30, context=ssl.create_default_context(cafile=str(pki["ca"]))
    )
    try:
        conn.putrequest(method, f"{path}?api-version={API_VERSION}", skip_accept_encoding=True)
        conn.putheader("Authorization", generate_sas_token(host, key, int(time.time()) + 600, "iothubowner"))
        conn.putheader("Host", host)
        headers.setdefault("Content-Length", str(len(body)))
        for k, v in headers.items():
            conn.putheader(k.replace("_", "-"), v)
        conn.endheaders(body)
        try:
            resp = conn.getresponse()
        except (http.client.RemoteDisconnected, ConnectionError):
            return 0, None
        raw = resp.read()
        return resp.status, (json.loads(raw) if raw else None)
    finally:
        conn.close()


def test_fake_hub_service_answers_hostile_requests_with_an_error(fleet, pki) -> None:
    """Bad input to the service API gets an HTTP error with a JSON reason, as from the real service, never a
    dropped connection: JSON nested 100 000 deep (json raised RecursionError), a query of 5 000 NOTs, a
    Content-Length that is not a number, is negative or announces 64 MiB, a method timeout that is not a number,
    infinite or outside the documented 5..300 s. The hub serves on."""
    hub, _ = fleet
    deep = b"[" * 100_000 + b"]" * 100_000
    not_query = json.dumps({"query": "SELECT * FROM devices WHERE " + "NOT " * 5000 + "deviceId = 'x'"}).encode()
    cases = [
        ("PATCH", "/twins/clinic-a", deep, {}),
        ("POST", "/devices/query", not_query, {}),
        ("POST", "/devices/query", b'{"query": "SELECT * FROM devices"}', {"Content_Length": "ten"}),
        ("POST", "/devices/query", b'{"query": "SELECT * FROM devices"}', {"Content_Length": "-1"}),
    ]
    for timeout in ('"soon"', "1e999", "0", "301", "[]"):
        body = f'{{"methodName": "m", "responseTimeoutInSeconds": {timeout}}}'.encode()
        cases.append(("POST", "/twins/clinic-a/methods", body, {}))
    for method, path, body, headers in cases:
        status, doc = _raw_service(hub, pki, method, path, body, **headers)
        assert status == 400 and isinstance(doc, dict) and doc.get("message"), (path, body[:60], headers, status, doc)
    status, doc = _raw_service(hub, pki, "POST", "/devices/query", b"{}", Content_Length=str(64 << 20))
    assert status == 413 and "over" in doc["message"], (status, doc)
    status, doc = _raw_service(hub, pki, "GET", "/twins/clinic-a", b"")
    assert status == 200 and doc["deviceId"] == "clinic-a"
