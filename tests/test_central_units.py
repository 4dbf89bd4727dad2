"""In-process pieces of the central tooling and the fake hub's service API: twin patch, status rows, connection
strings, the query language subset and the twin size count."""

from __future__ import annotations

import pytest

from appliance.central.hub_service import ConnectionString
from appliance.central.rollout import director_patch, status_rows
from testsupport.fakehub.hub import _twin_size
from testsupport.fakehub.service import ApiError, matches, parse_query

pytestmark = pytest.mark.unit


def test_director_patch_sets_only_what_is_given() -> None:
    assert director_patch("cxr", "1.1.0") == {
        "properties": {"desired": {"model_updates": {"bundles": {"cxr": {"version": "1.1.0"}}}}}
    }
    doc = director_patch("cxr", "1.1.0", window="22:00-05:00", health_studies=0, health_deadline_s=60)
    assert doc["properties"]["desired"]["model_updates"]["policy"] == {
        "window": "22:00-05:00",
        "health_studies": 0,
        "health_deadline_s": 60,
    }
    cleared = director_patch("cxr", "1.1.0", any_time=True)["properties"]["desired"]["model_updates"]
    assert cleared["policy"] == {"window": None}  # null deletes the window in the twin: any time


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bundle_id": "cxr/..", "version": "1.0.0"}, "not a valid bundle id"),
        ({"bundle_id": "cxr", "version": "1.0"}, "not a semantic version"),
        ({"bundle_id": "cxr\n", "version": "1.0.0"}, "not a valid bundle id"),
        ({"bundle_id": "cxr", "version": "1.0.0\n"}, "not a semantic version"),
        ({"bundle_id": "cxr", "version": "1\u0663.0.0"}, "not a semantic version"),
        ({"bundle_id": "cxr", "version": "1.0.0", "window": "22:00-05:00\n"}, "HH:MM-HH:MM"),
        ({"bundle_id": "cxr", "version": "1.0.0", "window": "0\u0662:00-05:00"}, "HH:MM-HH:MM"),
        ({"bundle_id": "cxr", "version": "1.0.0", "window": "22:00-24:00"}, "HH:MM-HH:MM"),
        ({"bundle_id": "cxr", "version": "1.0.0", "window": "22:00-05:00", "any_time": True}, "exclusive"),
        ({"bundle_id": "cxr", "version": "1.0.0", "health_studies": -1}, "greater than or equal to 0"),
        ({"bundle_id": "cxr", "version": "1.0.0", "health_deadline_s": 0}, "greater than 0"),
    ],
)
def test_director_patch_refuses_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        director_patch(**kwargs)


def test_status_rows_join_desired_and_reported() -> None:
    twin = {
        "deviceId": "d1",
        "connectionState": "Connected",
        "properties": {
            "desired": {"model_updates": {"bundles": {"cxr": {"version": "1.1.0"}, "mmg": {"version": "2.0.0"}}}},
            "reported": {
                "model_updates": {
                    "cxr": {"state": "downloading", "version": "1.1.0", "active_version": "1.0.0", "bytes": 5},
                    "old": {"state": "active", "version": "0.9.0", "active_version": "0.9.0"},
                    "$metadata": {},
                }
            },
        },
    }
    rows = {r.bundle_id: r for r in status_rows(twin)}
    assert sorted(rows) == ["cxr", "mmg", "old"]
    assert (rows["cxr"].desired, rows["cxr"].state, rows["cxr"].bytes, rows["cxr"].total) == (
        "1.1.0",
        "downloading",
        5,
        None,
    )
    assert (rows["mmg"].desired, rows["mmg"].state) == ("2.0.0", None)  # asked for, nothing reported yet
    assert (rows["old"].desired, rows["old"].state) == (None, "active")
    empty = status_rows({"deviceId": "d2", "properties": {"desired": {}, "reported": {}}})
    assert [(r.device_id, r.bundle_id, r.state) for r in empty] == [("d2", None, None)]


def test_connection_string_parse() -> None:
    cs = ConnectionString.parse("HostName=h.azure-devices.net;SharedAccessKeyName=service;SharedAccessKey=a2V5")
    assert (cs.host, cs.policy, cs.key) == ("h.azure-devices.net", "service", "a2V5")
    with pytest.raises(ValueError, match="lacks SharedAccessKeyName"):
        ConnectionString.parse("HostName=h;DeviceId=d;SharedAccessKey=a2V5")
    with pytest.raises(ValueError, match="not base64") as exc:
        ConnectionString.parse("HostName=h;SharedAccessKeyName=s;SharedAccessKey=not-base64!")
    assert "not-base64!" not in str(exc.value)  # never echo a key


TWINS = [
    {"deviceId": "a", "tags": {"clinic": "north", "beds": 4}, "properties": {"reported": {"fw": "1.2"}}},
    {"deviceId": "b", "tags": {"clinic": "south", "beds": 12}, "properties": {"reported": {}}},
    {"deviceId": "c", "tags": {"clinic": "o'neil"}, "properties": {"reported": {"fw": "1.3"}}},
]


@pytest.mark.parametrize(
    ("where", "selected"),
    [
        ("", ["a", "b", "c"]),
        (" WHERE tags.clinic = 'north'", ["a"]),
        (" where tags.clinic != 'north'", ["b", "c"]),
        (" WHERE tags.beds > 5", ["b"]),
        (" WHERE tags.beds >= 4 AND tags.clinic <> 'south'", ["a"]),
        (" WHERE tags.clinic = 'south' OR properties.reported.fw = '1.3'", ["b", "c"]),
        (" WHERE NOT (tags.clinic = 'south' OR tags.clinic = 'north')", ["c"]),
        (" WHERE tags.clinic = 'o''neil'", ["c"]),
        (" WHERE IS_DEFINED(properties.reported.fw)", ["a", "c"]),
        (" WHERE tags.beds > '3'", []),  # number vs string: no match, as in the hub's query language
        (" WHERE deviceId = 'b'", ["b"]),
    ],
)
def test_query_subset(where: str, selected: list[str]) -> None:
    tree = parse_query("SELECT * FROM devices" + where)
    assert [t["deviceId"] for t in TWINS if matches(tree, t)] == selected


@pytest.mark.parametrize(
    "query",
    [
        "SELECT deviceId FROM devices",
        "SELECT * FROM devices.modules",
        "SELECT * FROM devices WHERE",
        "SELECT * FROM devices WHERE tags.a = ",
        "SELECT * FROM devices WHERE tags.a = 'x' junk",
        "SELECT * FROM devices WHERE tags.a ~ 1",
        "DROP devices",
    ],
)
def test_query_outside_the_subset_is_a_clear_400(query: str) -> None:
    with pytest.raises(ApiError) as exc:
        parse_query(query)
    assert exc.value.status == 400 and exc.value.message


def test_twin_size_counted_as_the_device_twin_doc_says() -> None:
    """Keys and string values by characters (control characters not counted), numbers 8, booleans 4, nested
    objects the sum of their members, $-properties left out."""
    assert _twin_size({"a": 1, "b": [1, 2]}) == 1 + 8 + 1 + 8 + 8
    assert _twin_size({"a": "x\ty\u0085"}) == 1 + 2
    assert _twin_size({"é": {"ü": True}}) == 1 + 1 + 4  # characters, not UTF-8 bytes
    assert _twin_size({"$version": 7, "k": False}) == 1 + 4
