"""Turn one opened message (``result``, ``stats`` or ``feedback``) into rows of the store's tables
(:mod:`appliance.central.store_schema`): pure functions, one message at a time, any engine may call them.

The message formats are the box's (docs/CLOUD.md; issue 17's contract): ``result/v1`` (``appliance.cloud.deid``),
``stats/v1`` and ``feedback/v1``. A message is judged alone: a type this reader does not store (``audit``) is
skipped (None); a schema it does not know is refused with reason ``unknown_schema``; a body that breaks its
schema (wrong types, NaN or negative or absurd counts, histograms of the wrong length, a bundle id that is not
an id) with reason ``invalid``. Nothing here decides about duplicates (that is the ingest's state).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from appliance.central.received import Opened, Refused
from appliance.central.store_schema import bundle_key

SCHEMAS = {"result": "result/v1", "stats": "stats/v1", "feedback": "feedback/v1"}
SKIPPED_TYPES = frozenset({"audit"})  # encrypted, but not part of the results store
SITE_KEYS = ("site", "region", "health_system", "setting")
BINS = 20
MAX_COUNT = 1_000_000_000  # per box, bundle and day: more is not a count, it is a fault
MAX_MAP_KEYS = 64
MAX_STR = 256
VERDICTS = {"agree", "disagree", "uncertain"}
ROLES = {"viewer", "technician", "admin"}  # the dashboard roles (appliance.web.accounts.Role)
_MID = re.compile(r"^[A-Za-z0-9._:+=/-]{1,128}\Z")
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}\Z")

Site = Mapping[str, str | None]


@dataclass(frozen=True)
class Flat:
    """One message's rows: ``rows[table]`` (dicts in that table's column names); ``date`` (YYYY-MM-DD, of the
    enqueued time) and ``bundle`` (``<id>@<version>``) are the partition the rows go to."""

    mid: str
    device: str
    date: str
    bundle: str
    rows: dict[str, list[dict[str, Any]]]


def _bad(detail: str) -> Refused:
    return Refused("invalid", detail)


def _str(doc: Mapping[str, Any], key: str, *, required: bool = False) -> str | None:
    v = doc.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v or len(v) > MAX_STR:
        raise _bad(f"{key} must be a string of 1..{MAX_STR} characters")
    return v


def _num(v: Any, key: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(f"{key} must be a finite number or null")
    return float(v)


def _bool(v: Any, key: str) -> bool | None:
    if v is None or isinstance(v, bool):
        return v
    raise _bad(f"{key} must be true, false or null")


def _count(v: Any, key: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_COUNT:
        raise _bad(f"{key} must be an integer count in 0..{MAX_COUNT}, not {str(v)[:40]}")
    return v


def _int32(v: Any, key: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**31:
        raise _bad(f"{key} must be a non-negative integer or null")
    return v


def _list(doc: Mapping[str, Any], key: str) -> list[Any]:
    v = doc.get(key)
    if v is None:
        return []
    if not isinstance(v, list):
        raise _bad(f"{key} must be a list")
    return v


def _map(v: Any, key: str) -> Mapping[str, Any]:
    if (
        not isinstance(v, Mapping)
        or len(v) > MAX_MAP_KEYS
        or any(not isinstance(k, str) or len(k) > MAX_STR for k in v)
    ):
        raise _bad(f"{key} must be an object of at most {MAX_MAP_KEYS} string keys")
    return v


def _day(v: Any, key: str) -> dt.date:
    if not isinstance(v, str) or not _DAY.match(v):
        raise _bad(f"{key} must be YYYY-MM-DD")
    try:
        return dt.date.fromisoformat(v)
    except ValueError as exc:
        raise _bad(f"{key}: {exc}") from exc


def parse_utc(text: Any) -> dt.datetime:
    """An ISO 8601 UTC time as IoT Hub and the box write it (``...Z`` or ``+00:00``; up to 7 fraction digits, the
    .NET round-trip form, truncated to microseconds) -> aware UTC datetime. Raises ValueError."""
    if not isinstance(text, str) or len(text) > 40:
        raise ValueError("not a time string")
    m = re.match(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})\Z", text)
    if not m:
        raise ValueError(f"{text[:40]!r} is not an ISO 8601 time with a zone")
    frac = (m.group(2) or "").ljust(6, "0")[:6]
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    return dt.datetime.fromisoformat(f"{m.group(1)}.{frac}{zone}").astimezone(dt.timezone.utc)


def _histogram(v: Any, key: str) -> list[int]:
    if not isinstance(v, list) or len(v) != BINS:
        raise _bad(f"{key} must be a list of {BINS} counts")
    return [_count(c, key) for c in v]


def _result_rows(doc: Mapping[str, Any], base: dict[str, Any], site: Site) -> dict[str, list[dict[str, Any]]]:
    study = _str(doc, "study_uid")
    urgent = doc.get("urgent")
    if urgent is not None and not isinstance(urgent, list):
        raise _bad("urgent must be a list of labels")
    result = {
        **base,
        **{k: site.get(k) for k in SITE_KEYS},
        "study": study,
        "modality": _str(doc, "modality"),
        "task": _str(doc, "task"),
        "study_score": _num(doc.get("study_score"), "study_score"),
        "urgent": bool(urgent),
        "n_images": len(_list(doc, "images")),
        "n_refused": len(_list(doc, "refused_images")),
        "operating_point_version": _int32(doc.get("operating_point_version"), "operating_point_version"),
        "schema": SCHEMAS["result"],
    }
    findings = []
    for f in _list(doc, "findings"):
        if not isinstance(f, Mapping):
            raise _bad("a finding must be an object")
        source = _str(f, "threshold_source")
        if source not in (None, "manifest", "site"):
            raise _bad("threshold_source must be 'manifest', 'site' or null")
        findings.append(
            {
                **base,
                "site": site.get("site"),
                "study": study,
                "image": _str(f, "image_sop_uid"),
                "label": _str(f, "label"),
                "score": _num(f.get("score"), "findings.score"),
                "positive": _bool(f.get("positive"), "findings.positive"),
                "threshold": _num(f.get("threshold"), "findings.threshold"),
                "threshold_source": source,
            }
        )
    return {"results": [result], "findings": findings}


def _stats_rows(doc: Mapping[str, Any], base: dict[str, Any], site: Site) -> dict[str, list[dict[str, Any]]]:
    edges = doc.get("score_edges")
    if not isinstance(edges, list) or len(edges) != BINS + 1:
        raise _bad(f"score_edges must be {BINS + 1} edges")
    try:
        generated = parse_utc(doc.get("generated_at"))
    except ValueError as exc:
        raise _bad(f"generated_at: {exc}") from exc
    common = {
        **base,
        **{k: site.get(k) for k in SITE_KEYS},
        "day": _day(doc.get("day"), "day"),
        "generated_at": generated,
    }
    rows: list[dict[str, Any]] = []

    def add(metric: str, key: str, count: int) -> None:
        rows.append({**common, "metric": metric, "key": key, "count": count})

    for label, hist in _map(doc.get("scores") or {}, "scores").items():
        for i, c in enumerate(_histogram(hist, f"scores.{label}")):
            add(f"score:{label}", str(i), c)
    for name in ("study_score", "input_mean", "input_p95"):
        if doc.get(name) is not None:
            for i, c in enumerate(_histogram(doc[name], name)):
                add(name, str(i), c)
    for label, c in _map(doc.get("positives") or {}, "positives").items():
        add(f"positives:{label}", "", _count(c, f"positives.{label}"))
    counts = {name: _count(doc.get(name), name) for name in ("studies", "images", "not_analysed")}
    for name, c in counts.items():
        add(f"count:{name}", "", c)
    for name, hist_map in _map(doc.get("inputs") or {}, "inputs").items():
        for key, c in _map(hist_map, f"inputs.{name}").items():
            add(f"inputs:{name}", key, _count(c, f"inputs.{name}.{key}"))
    for category, c in _map(doc.get("refusals") or {}, "refusals").items():
        add("refusals", category, _count(c, f"refusals.{category}"))
    for label, c in ((k[len("positives:") :], r["count"]) for r in rows if (k := r["metric"]).startswith("positives:")):
        if c > counts["studies"] + counts["images"]:
            raise _bad(f"positives.{label} ({c}) exceeds the studies and images counted")
    return {"stats": rows}


def _feedback_rows(doc: Mapping[str, Any], base: dict[str, Any], site: Site) -> dict[str, list[dict[str, Any]]]:
    kind = doc.get("kind")
    verdict = doc.get("verdict")
    outcome = doc.get("outcome")
    if kind not in ("finding", "outcome"):
        raise _bad("kind must be 'finding' or 'outcome'")
    if verdict is not None and verdict not in VERDICTS:
        raise _bad(f"verdict must be one of {sorted(VERDICTS)} or null")
    if kind == "finding" and verdict is None:
        raise _bad("a finding feedback needs a verdict")
    if outcome is not None and not (
        isinstance(outcome, Mapping)
        and isinstance(outcome.get("code"), str)
        and isinstance(outcome.get("positive"), bool)
    ):
        raise _bad("outcome must be {code: str, positive: bool} or null")
    if kind == "outcome" and outcome is None:
        raise _bad("an outcome feedback needs an outcome")
    if doc.get("role") not in ROLES:
        raise _bad(f"role must be one of {sorted(ROLES)}")
    _day(doc.get("day"), "day")
    row = {
        **base,
        "site": site.get("site"),
        "result_mid": _str(doc, "result_mid", required=True),
        "study": _str(doc, "study"),
        "kind": kind,
        "label": _str(doc, "label"),
        "verdict": verdict,
        "outcome_code": _str(outcome, "code") if outcome else None,
        "outcome_positive": outcome["positive"] if outcome else None,
    }
    return {"feedback": [row]}


_ROWS = {"result": _result_rows, "stats": _stats_rows, "feedback": _feedback_rows}


def flatten(opened: Opened, enqueued_time: dt.datetime, site: Site | None = None) -> Flat | None:
    """Rows for one opened message; None for a type the store does not keep (``audit``).

    ``enqueued_time``: the hub's (aware, UTC); ``site``: the device's site dimension (keys :data:`SITE_KEYS`,
    missing = null). Raises :class:`Refused` (``unknown_schema``, ``invalid``, ``malformed``)."""
    meta = opened.meta
    kind, schema, mid = meta.get("type"), meta.get("schema"), meta.get("mid")
    if kind in SKIPPED_TYPES:
        return None
    if kind not in SCHEMAS or schema != SCHEMAS[kind]:
        raise Refused(
            "unknown_schema", f"type {str(kind)[:40]!r} schema {str(schema)[:40]!r}: this reader knows {SCHEMAS}"
        )
    if not isinstance(mid, str) or not _MID.match(mid):
        raise Refused("malformed", "envelope mid is not an id of 1..128 characters")
    try:
        doc = json.loads(opened.plaintext)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Refused("malformed", f"plaintext is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise Refused("malformed", "plaintext is not a JSON object")
    if doc.get("schema") != schema:
        raise Refused(
            "unknown_schema", f"plaintext schema {str(doc.get('schema'))[:40]!r} is not the envelope's {schema!r}"
        )
    try:
        bundle = bundle_key(doc.get("bundle_id"), doc.get("bundle_version"))  # type: ignore[arg-type]
    except ValueError as exc:
        raise _bad(str(exc)) from exc
    base = {
        "mid": mid,
        "device": opened.device,
        "enqueued_time": enqueued_time,
        "bundle_id": doc["bundle_id"],
        "bundle_version": doc["bundle_version"],
    }
    rows = _ROWS[kind](doc, base, site or {})
    return Flat(mid, opened.device, enqueued_time.date().isoformat(), bundle, rows)
