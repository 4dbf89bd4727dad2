"""Staged rollouts through the twin (Uptane's director role) and the fleet's update status from reported properties.

A rollout writes ``desired.model_updates`` (:mod:`appliance.updates.layout`) on each chosen device: the
version a bundle id should run and, when given, the policy (maintenance window, health gate). It is a twin
PATCH with ``If-Match`` on the etag just read, retried on 412, so a concurrent writer is never overwritten
blindly; other bundles' entries are kept (a PATCH merges). Each box then reconciles by itself and reports
``reported.model_updates`` per bundle, which :func:`fleet_status` reads back.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from appliance.central.hub_service import EtagMismatch, HubService, HubServiceError
from appliance.core.logs import get_logger
from appliance.updates import layout
from appliance.updates.director import parse_director

log = get_logger(__name__)
# ASCII digits only ([0-9]: \d matches any Unicode digit) and \Z ("$" also matches before a final newline)
ETAG_RETRIES = 5


def director_patch(
    bundle_id: str,
    version: str,
    *,
    window: str | None = None,
    any_time: bool = False,
    health_studies: int | None = None,
    health_deadline_s: float | None = None,
) -> dict[str, Any]:
    """The twin patch ``{"properties": {"desired": {"model_updates": ...}}}`` for one bundle version.

    ``window`` "HH:MM-HH:MM" (box local time, may wrap midnight); ``any_time`` clears a window set before;
    policy fields left None are not changed. Raises ValueError naming the bad value (the box applies the
    same rules and would reject the whole document).
    """
    if window is not None and any_time:
        raise ValueError("a window and any-time are exclusive")
    policy: dict[str, Any] = {}
    if window is not None or any_time:
        policy["window"] = window  # null deletes the property: any time
    if health_studies is not None:
        policy["health_studies"] = health_studies
    if health_deadline_s is not None:
        policy["health_deadline_s"] = health_deadline_s
    doc: dict[str, Any] = {"bundles": {bundle_id: {"version": version}}}
    if policy:
        doc["policy"] = policy
    parse_director(doc)  # the box's own rules (ValueError naming each problem): it would reject the document
    return {"properties": {"desired": {layout.DESIRED_KEY: doc}}}


def select_devices(service: HubService, device_ids: Iterable[str] = (), query: str | None = None) -> list[str]:
    """The device ids named plus those a twin ``query`` selects (``SELECT * FROM devices WHERE ...``), in order,
    each once."""
    out = list(dict.fromkeys(device_ids))
    if query:
        for twin in service.query(query):
            if twin["deviceId"] not in out:
                out.append(twin["deviceId"])
    return out


@dataclass(frozen=True)
class RolloutResult:
    """What one device's twin update did: the new desired ``$version``, or the error."""

    device_id: str
    desired_version: int | None
    error: str | None = None


def rollout(service: HubService, device_ids: Iterable[str], patch: dict[str, Any]) -> list[RolloutResult]:
    """Apply ``patch`` to each device's twin (read, PATCH with If-Match, retry on 412). One device's failure
    (unknown device, unreachable hub) is recorded in its result and the others still proceed."""
    return [_rollout_one(service, dev, patch) for dev in device_ids]


def _rollout_one(service: HubService, dev: str, patch: dict[str, Any]) -> RolloutResult:
    for _ in range(ETAG_RETRIES):
        try:
            etag = service.get_twin(dev)["etag"]
            twin = service.update_twin(dev, patch, etag)
        except EtagMismatch:
            continue  # someone else changed the twin in between: read it again
        except HubServiceError as exc:
            return RolloutResult(dev, None, str(exc))
        version = int(twin["properties"]["desired"]["$version"])
        log.info("central.rollout", device_id=dev, desired_version=version)
        return RolloutResult(dev, version)
    return RolloutResult(dev, None, f"the twin changed {ETAG_RETRIES} times while being updated")


@dataclass(frozen=True)
class StatusRow:
    """One device's state for one bundle, from its twin."""

    device_id: str
    connection: str  # Connected | Disconnected
    bundle_id: str | None
    desired: str | None  # the version the director asks for
    state: str | None  # layout.UpdateState value, None if the box has reported nothing for this bundle
    version: str | None
    active_version: str | None
    bytes: int | None
    total: int | None
    reason: str | None
    since: str | None


def _obj(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _text(v: Any) -> str | None:
    """A twin value shown as text: a string as is, None as None, anything else (a device reporting the wrong
    JSON type) as its JSON text, so it is visible and never breaks a reader."""
    if v is None or isinstance(v, str):
        return v
    return json.dumps(v, sort_keys=True)


def _count(v: Any) -> int | None:
    """A twin value that must be a whole number (bytes): None for anything else (booleans included)."""
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def status_rows(twin: dict[str, Any]) -> list[StatusRow]:
    """Rows for every bundle a twin's desired or reported ``model_updates`` names (one empty row if none)."""
    props = _obj(twin.get("properties"))
    desired = _obj(_obj(_obj(props.get("desired")).get(layout.DESIRED_KEY)).get("bundles"))
    reported = _obj(_obj(props.get("reported")).get(layout.REPORTED_KEY))  # written by the device: any JSON
    ids = sorted({*desired, *(k for k in reported if not k.startswith("$"))})
    dev, conn = str(twin["deviceId"]), str(twin.get("connectionState") or "")
    if not ids:
        return [StatusRow(dev, conn, None, None, None, None, None, None, None, None, None)]
    rows = []
    for bid in ids:
        r = _obj(reported.get(bid))
        want = _obj(desired.get(bid))
        rows.append(
            StatusRow(
                dev,
                conn,
                bid,
                _text(want.get("version")),
                _text(r.get("state")),
                _text(r.get("version")),
                _text(r.get("active_version")),
                _count(r.get("bytes")),
                _count(r.get("total")),
                _text(r.get("reason")),
                _text(r.get("since")),
            )
        )
    return rows


def fleet_status(service: HubService, query: str = "SELECT * FROM devices") -> list[StatusRow]:
    """:func:`status_rows` of every device the query selects (default: all), ordered by device id."""
    rows: list[StatusRow] = []
    for twin in service.query(query):
        rows += status_rows(twin)
    return sorted(rows, key=lambda r: (r.device_id, r.bundle_id or ""))


def operating_point_patch(signed: dict[str, Any]) -> dict[str, Any]:
    """The twin patch ``{"properties": {"desired": {"operating_points": {bundle_id: signed}}}}`` for one signed
    site operating point (:func:`appliance.cloud.operating_points.sign`); checked with the box's own
    :func:`appliance.cloud.operating_points.parse` first (ValueError), so what the box would refuse for its shape
    never reaches a twin."""
    from appliance.cloud import operating_points

    _signed, op = operating_points.parse(signed)
    return {"properties": {"desired": {"operating_points": {op.bundle_id: signed}}}}
