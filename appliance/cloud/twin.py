"""Device twin: desired properties (validated, versioned, persisted) and reported properties.

Order per Microsoft's twin guide: on every (re)connect subscribe, GET the full twin, apply its desired
section, then apply only patches whose ``$version`` is newer. The hub's desired document is tracked as
received; it is applied only when the whole document validates, otherwise the reason is reported back
(``reported.desired_status``) and the previously applied settings stay in force.
"""

from __future__ import annotations

import copy
import json
import sqlite3
import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from appliance.cloud import keysets, operating_points
from appliance.core.logs import get_logger

log = get_logger(__name__)

MAX_TWIN_BYTES = 32 * 1024  # per section (desired, reported), counted as the hub counts it: twin_size
MAX_MESSAGE_BYTES = 4 * MAX_TWIN_BYTES  # a twin message larger than this cannot hold a 32 KB section: not parsed
MAX_DEPTH = 10


class Desired(BaseModel):
    """The desired properties this build understands; anything else is an error reported back."""

    model_config = ConfigDict(extra="forbid")

    health_interval_s: float | None = Field(default=None, ge=1, le=86400)
    upload_results: bool | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] | None = None
    outbox_ttl_days: int | None = Field(default=None, ge=1, le=365)
    recipient_keyset: dict[str, Any] | None = Field(
        default=None, description="a key set signed by the central team (appliance.cloud.keysets)"
    )
    recipient_key_ids: list[str] | None = Field(
        default=None, min_length=1, max_length=16, description="which keys of the set in force to encrypt to"
    )
    # the director of model updates (appliance.updates.layout.DESIRED_KEY); validated by the update agent
    # (the desired hook), whose ValueError rejects the whole document like any other invalid property
    model_updates: dict[str, Any] | None = Field(default=None, description="the update agent's director document")
    # bundle id -> a site operating point signed by the central team (appliance.cloud.operating_points)
    operating_points: dict[str, dict[str, Any]] | None = Field(
        default=None, max_length=64, description="site operating points signed by the central team"
    )

    @model_validator(mode="before")
    @classmethod
    def _no_raw_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "recipient_keys" in data:
            raise ValueError(
                "recipient_keys: refused: the twin cannot supply encryption keys; keys come only in a "
                "recipient_keyset signed by the central team"
            )
        return data

    @field_validator("operating_points")
    @classmethod
    def _operating_points(cls, v: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]] | None:
        for bundle_id, doc in (v or {}).items():
            _signed, op = operating_points.parse(doc)  # shape only: signature and manifest are checked on apply
            if op.bundle_id != bundle_id:
                raise ValueError(f"operating point for bundle {op.bundle_id!r} given under {bundle_id!r}")
        return v

    @field_validator("recipient_keyset")
    @classmethod
    def _keyset(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            keysets.parse(v)  # shape only: the signature is checked against the box's trusted keys on apply
        return v


def merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """JSON merge patch as the twin uses it: nested objects merge, null deletes."""
    out = copy.deepcopy(target)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_patch(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _depth(obj: Any) -> int:
    return 1 + max((_depth(v) for v in obj.values()), default=0) if isinstance(obj, dict) else 0


def _chars(text: str) -> int:
    """Characters of a UTF-8 string as the hub counts them: all but Unicode control characters (C0 and C1)."""
    return sum(1 for ch in text if not (ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F))


def twin_size(doc: Any) -> int:
    """The size IoT Hub charges a twin section against its 32 KB limit ("Understand and use device twins in IoT
    Hub", twin size): per property, its key's characters plus its value's size; a string counts its characters
    (Unicode control characters excluded), a number 8, a boolean 4, null 0, an object or array the sum of what
    it holds. Read-only ``$`` properties ($version, $metadata, ...) are not counted."""
    if isinstance(doc, dict):
        return sum(_chars(k) + twin_size(v) for k, v in doc.items() if not k.startswith("$"))
    if isinstance(doc, list):
        return sum(twin_size(v) for v in doc)
    if isinstance(doc, bool):
        return 4
    if isinstance(doc, (int, float)):
        return 8
    if isinstance(doc, str):
        return _chars(doc)
    return 0


def parse_json_object(raw: bytes, what: str) -> dict[str, Any]:
    """One twin message body as a JSON object; ValueError (never RecursionError) for anything the twin does
    not allow: over the size limit, not JSON, not an object, nested deeper than the hub allows."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise ValueError(f"{what} of {len(raw)} bytes is over the 32 KB twin limit")
    try:
        doc = json.loads(raw)
    except RecursionError as exc:  # a few thousand brackets exhaust the parser's stack
        raise ValueError(f"{what} is nested deeper than {MAX_DEPTH} (too deep to parse)") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(doc).__name__}")
    if _depth(doc) > MAX_DEPTH:
        raise ValueError(f"{what} is nested deeper than {MAX_DEPTH}")
    return doc


def strip_meta(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if not k.startswith("$")}


def validate(doc: dict[str, Any]) -> Desired:
    try:
        return Desired.model_validate(doc)
    except ValidationError as exc:
        reasons = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ValueError("; ".join(reasons)) from exc


MAX_VERSION = 2**63 - 1  # the hub's $version is a 64-bit integer; anything larger is not a version


def _stored(raw: str, parse: Callable[[str], Any], key: str) -> Any:
    """``parse(raw)``, or None (logged) when the stored ``cloud_state`` value cannot be parsed."""
    try:
        return parse(raw)
    except (ValueError, TypeError) as exc:
        log.warning("unreadable twin state ignored", key=key, error=str(exc)[:200])
        return None


def _version(value: Any) -> int | None:
    """A desired ``$version`` (a non-negative 64-bit integer, not a bool), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_VERSION:
        return value
    return None


class TwinState:
    """Persisted desired-property state (``cloud_state`` rows: the hub's document, its version and the status
    reported back) and the decision logic around it. What is in force is the agent's settings overlay
    (:mod:`appliance.cloud.overlay`), not a copy here."""

    def __init__(self, conn_fn: Callable[[], sqlite3.Connection], apply: Callable[[Desired, int], None]):
        """``apply(desired, version)`` puts a validated document in force (the agent's settings overlay); an
        exception from it rejects the document with its message."""
        self._conn = conn_fn
        self._apply = apply
        # rows that cannot be read (a damaged database, an older or newer build) are forgotten with a warning:
        # the full twin GET at the next connection brings the hub's document back; never a crash at startup
        version = _stored(self._get("twin.desired_version", "0"), lambda raw: int(raw), "twin.desired_version")
        self.version: int = version if isinstance(version, int) and 0 <= version <= MAX_VERSION else 0
        doc = _stored(self._get("twin.desired_doc", "{}"), json.loads, "twin.desired_doc")
        self.doc: dict[str, Any] = doc if isinstance(doc, dict) else {}
        status = _stored(self._get("twin.desired_status", "null"), json.loads, "twin.desired_status")
        self.status: dict[str, Any] = status if isinstance(status, dict) else {}

    def _get(self, key: str, default: str) -> str:
        row = self._conn().execute("SELECT value FROM cloud_state WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def _save(self) -> None:
        conn = self._conn()
        t = time.time()
        conn.execute("BEGIN IMMEDIATE")
        try:
            for k, v in (
                ("twin.desired_version", str(self.version)),
                ("twin.desired_doc", json.dumps(self.doc)),
                ("twin.desired_status", json.dumps(self.status)),
            ):
                conn.execute(
                    "INSERT INTO cloud_state(key, value, updated_at) VALUES (?,?,?) "
                    "ON CONFLICT(key) DO UPDATE SET value=excluded.value, updated_at=excluded.updated_at",
                    (k, v, t),
                )
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def on_full(self, raw: bytes) -> None:
        """A GET response: the hub's whole twin; its desired section replaces ours."""
        try:
            twin = parse_json_object(raw, "twin document")
            desired = twin.get("desired")
            version = _version(desired.get("$version")) if isinstance(desired, dict) else None
            if not isinstance(desired, dict) or version is None:
                raise ValueError("twin document has no desired section with a 64-bit integer $version")
            if twin_size(desired) > MAX_TWIN_BYTES:
                raise ValueError(f"desired section of size {twin_size(desired)} is over the 32 KB twin limit")
        except ValueError as exc:
            log.error("twin GET response rejected", reason=str(exc))
            return
        self._consider(strip_meta(desired), version, full=True)

    def on_patch(self, raw: bytes, topic_version: int | None) -> bool:
        """A desired-properties patch; False if it was ignored as not newer than what we have."""
        version = _version(topic_version)
        try:
            patch = parse_json_object(raw, "desired patch")
            if "$version" in patch:
                version = _version(patch["$version"])
                if version is None:
                    raise ValueError(f"$version {str(patch['$version'])[:40]} is not a 64-bit integer version")
        except ValueError as exc:
            if version is not None and version <= self.version:
                return False
            self._reject(version, str(exc), doc=None)
            return True
        if version is None:
            self._reject(None, "desired patch without $version", doc=None)
            return True
        if version <= self.version:
            log.info("desired patch ignored: not newer", version=version, have=self.version)
            return False
        merged = merge_patch(self.doc, strip_meta(patch))
        size = twin_size(merged)
        if size > MAX_TWIN_BYTES:
            self._reject(version, f"desired section of size {size} is over the 32 KB twin limit", doc=None)
            return True
        self._consider(merged, version, full=False)
        return True

    def _consider(self, doc: dict[str, Any], version: int, full: bool) -> None:
        try:
            desired = validate(doc)
        except ValueError as exc:
            self._reject(version, str(exc), doc=doc)
            return
        try:
            self._apply(desired, version)
        except Exception as exc:
            log.exception("desired properties could not be applied", version=version)
            self._reject(version, f"apply failed: {exc}", doc=doc)
            return
        self.doc, self.version = doc, version
        self.status = {"version": version, "status": "applied", "reason": None, "at": int(time.time())}
        self._save()
        log.info("desired properties applied", version=version, full=full, keys=sorted(doc))

    def _reject(self, version: int | None, reason: str, doc: dict[str, Any] | None) -> None:
        log.warning("desired properties rejected; nothing applied", version=version, reason=reason)
        if doc is not None:
            self.doc = doc  # the hub's document as it now stands (a later patch may fix it)
        if version is not None:
            self.version = max(self.version, version)
        self.status = {"version": version, "status": "rejected", "reason": reason[:1000], "at": int(time.time())}
        self._save()
