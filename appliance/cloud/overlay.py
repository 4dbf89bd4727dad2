"""Runtime cloud settings: the config file's ``[cloud]`` section overlaid by the twin's desired properties.

The ``Settings`` object read from the config file is never mutated. What the central team may change at run
time through the twin (``Desired`` in :mod:`appliance.cloud.twin`: health interval, result upload on/off, log
level, outbox TTL, a signed recipient key set and the choice among its keys) is applied here as an explicit
overlay:

- **validated**: only a whole ``Desired`` document that passed validation is applied;
- **versioned**: each applied overlay carries the twin's desired ``$version`` it came from (``TwinState``
  decides the order: only newer patches, and the full twin after each connect, which is authoritative even
  when its version is lower, e.g. a device identity re-created in the hub);
- **persisted**: the one copy lives in the ``settings_overlay`` table (this module is its only writer), so
  it survives restarts before the hub is reachable again;
- **keys only from the central team**: a ``recipient_keyset`` is in force only once verified against
  ``cloud.keyset_trusted_keys`` (:mod:`appliance.cloud.keysets`: signature, expiry, never older than the newest
  accepted, remembered in ``settings_overlay.keyset_version``); ``recipient_key_ids`` may only pick among the
  keys in force (the set's, else the config file's ``cloud.recipient_keys``). A set that expires while in force
  gives way to the config file's keys;
- **operating points only from the central team**: each of ``operating_points`` (bundle id -> a signed site
  operating point, :mod:`appliance.cloud.operating_points`) is in force only once verified against the same
  ``cloud.keyset_trusted_keys``, never older than the newest accepted for its bundle (remembered in
  ``settings_overlay.operating_points_newest``), and accepted by the composition root's check (the labels and
  ranges of the bundle's installed manifest);
- **read through one locked accessor**: :meth:`CloudOverlay.current` returns an immutable
  :class:`EffectiveCloud` snapshot; readers on other threads (pipeline, sender, health) never see half an
  update.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from appliance.cloud import keysets, operating_points
from appliance.cloud.operating_points import OperatingPoint, OperatingPointError
from appliance.cloud.twin import Desired, validate
from appliance.core.config import CloudConfig
from appliance.core.logs import get_logger
from appliance.core.store import Store

log = get_logger(__name__)

OperatingPointCheck = Callable[[str, Mapping[str, float]], None]
"""(bundle id, label -> threshold): raises ValueError unless the bundle's installed manifest allows them."""


@dataclass(frozen=True)
class EffectiveCloud:
    """The cloud settings in force: config-file values with the applied overlay on top.

    ``version`` is the twin desired ``$version`` of the applied overlay (0: none applied, config only).
    ``recipient_keys`` maps key id -> base64 X25519 public key (read-only mapping): the signed key set's (or the
    config file's) keys, narrowed to ``recipient_key_ids`` when the twin chose. ``keyset_version`` is the signed
    set in force (0: the config file's keys); ``keys_expire_at`` its expiry (epoch s; None for config keys).
    """

    version: int
    health_interval_s: float  # seconds between health messages
    upload_results: bool
    log_level: str | None  # None: the config file's log.level stays
    outbox_ttl_days: int
    recipient_keys: Mapping[str, str]
    keyset_version: int = 0
    keys_expire_at: float | None = None
    # bundle id -> the verified site operating point in force (read-only mapping)
    operating_points: Mapping[str, OperatingPoint] = field(default_factory=lambda: MappingProxyType({}))
    # bundle id -> why the twin's operating point for it was refused (its previous one, if any, stays in force)
    operating_points_refused: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def outbox_ttl_s(self) -> float:
        return self.outbox_ttl_days * 86400.0


def _recipients(
    base: CloudConfig, d: Desired, newest: tuple[int, str] | None
) -> tuple[dict[str, str], keysets.KeySet | None]:
    """(keys in force, the verified key set or None). Raises ``KeySetError`` for a set the box must refuse and
    ``ValueError`` for a chosen key id that is not among the keys in force."""
    keyset = None
    available = dict(base.recipient_keys)
    if d.recipient_keyset is not None:
        keyset = keysets.verify(d.recipient_keyset, base.keyset_trusted_keys, newest=newest)
        available = dict(keyset.keys)
    if d.recipient_key_ids is not None:
        unknown = sorted(set(d.recipient_key_ids) - set(available))
        if unknown:
            raise ValueError(f"recipient_key_ids {unknown} are not among the keys in force {sorted(available)}")
        available = {kid: available[kid] for kid in d.recipient_key_ids}
    return available, keyset


def _operating_points(
    base: CloudConfig,
    d: Desired,
    newest: Mapping[str, tuple[int, str]],
    check: OperatingPointCheck | None,
    previous: Mapping[str, OperatingPoint],
) -> tuple[dict[str, OperatingPoint], dict[str, str]]:
    """(the operating points in force, bundle id -> why its new one was refused). Each bundle's document is judged
    alone: a refused one (:class:`OperatingPointError`) leaves that bundle's ``previous`` operating point in force
    (none: the manifest's thresholds) and never blocks the other bundles' or the rest of the desired document
    (key sets, model updates), which are signed and judged on their own."""
    out: dict[str, OperatingPoint] = {}
    refused: dict[str, str] = {}
    for bundle_id, doc in (d.operating_points or {}).items():
        try:
            op = operating_points.verify(doc, base.keyset_trusted_keys, newest=newest.get(bundle_id))
            if check is not None:
                try:
                    check(bundle_id, op.thresholds)
                except ValueError as exc:
                    raise OperatingPointError("not_allowed", str(exc)) from exc
        except OperatingPointError as exc:
            refused[bundle_id] = str(exc)[:500]
            if bundle_id in previous:
                out[bundle_id] = previous[bundle_id]
            continue
        out[bundle_id] = op
    return out, refused


def _effective(
    base: CloudConfig,
    desired: Desired | None,
    version: int,
    newest: tuple[int, str] | None = None,
    op_newest: Mapping[str, tuple[int, str]] | None = None,
    check: OperatingPointCheck | None = None,
    previous: Mapping[str, OperatingPoint] | None = None,
) -> EffectiveCloud:
    d = desired or Desired()
    keys, keyset = _recipients(base, d, newest)
    ops, refused = _operating_points(base, d, op_newest or {}, check, previous or {})
    return EffectiveCloud(
        version=version,
        health_interval_s=d.health_interval_s or base.health_interval_s,
        upload_results=base.upload_results if d.upload_results is None else d.upload_results,
        log_level=d.log_level,
        outbox_ttl_days=d.outbox_ttl_days or base.outbox_ttl_days,
        recipient_keys=MappingProxyType(keys),
        keyset_version=keyset.version if keyset is not None else 0,
        keys_expire_at=float(keyset.expires_at) if keyset is not None else None,
        operating_points=MappingProxyType(ops),
        operating_points_refused=MappingProxyType(refused),
    )


def _without_keys(desired: Desired) -> Desired:
    return desired.model_copy(update={"recipient_keyset": None, "recipient_key_ids": None})


def _without_operating_points(desired: Desired) -> Desired:
    return desired.model_copy(update={"operating_points": None})


class CloudOverlay:
    """Owner of the runtime overlay (table ``settings_overlay``) and its one accessor.

    Construction reads the persisted overlay (an invalid stored document, e.g. after a downgrade that no
    longer knows a key, is ignored with a warning: the config file's values apply).
    """

    def __init__(self, base: CloudConfig, store: Store, check_operating_point: OperatingPointCheck | None = None):
        """``check_operating_point``: the composition root's check of a new operating point against the bundle's
        installed manifest (None: signature and version only). The stored overlay is not checked again at
        start: postprocess checks each site threshold against the manifest that judges a study."""
        self._base = base
        self._store = store
        self._lock = threading.Lock()
        self.check_operating_point = check_operating_point
        row = store.query(
            "SELECT version, doc, keyset_version, keyset_content, operating_points_newest FROM settings_overlay"
            " WHERE id=1"
        )
        desired, version = None, 0
        self._newest: tuple[int, str] | None = None  # (version, content) of the newest key set ever accepted
        self._op_newest: dict[str, tuple[int, str]] = {}  # bundle id -> the same for its operating points
        if row:
            if row[0]["keyset_version"]:
                self._newest = (int(row[0]["keyset_version"]), str(row[0]["keyset_content"]))
            try:
                stored = json.loads(row[0]["operating_points_newest"] or "{}")
                self._op_newest = {str(k): (int(v[0]), str(v[1])) for k, v in stored.items()}
            except (ValueError, TypeError, IndexError, AttributeError) as exc:
                log.warning("stored operating point versions unreadable; forgotten", reason=str(exc))
            try:
                desired, version = validate(json.loads(row[0]["doc"])), int(row[0]["version"])
            except ValueError as exc:
                log.warning("stored settings overlay ignored: no longer valid", reason=str(exc))
        try:
            # a stored operating point no longer accepted (e.g. its signer is no longer trusted) is left out: the
            # manifest's thresholds judge that bundle (logged below)
            self._current = _effective(base, desired, version, self._newest, self._op_newest)
        except ValueError as exc:  # e.g. the stored key set expired meanwhile: the config file's keys
            log.warning("stored recipient key set no longer in force; config keys used", reason=str(exc))
            self._current = _effective(base, _without_operating_points(_without_keys(desired or Desired())), version)
        # bundle id -> the signed document of the operating point in force (what is persisted for it)
        self._op_docs: dict[str, dict] = {
            b: doc
            for b, doc in ((desired.operating_points or {}) if desired else {}).items()
            if b in self._current.operating_points
        }
        for bundle_id, reason in self._current.operating_points_refused.items():
            log.warning(
                "stored operating point no longer in force; manifest thresholds used", bundle=bundle_id, reason=reason
            )
        self._apply_log_level(self._current)

    def current(self) -> EffectiveCloud:
        """The settings in force now (an immutable snapshot). A signed key set past its expiry gives way to
        the config file's ``cloud.recipient_keys`` here (logged once)."""
        with self._lock:
            cur = self._current
            if cur.keys_expire_at is not None and time.time() >= cur.keys_expire_at:
                log.warning("recipient key set expired; config keys used", keyset_version=cur.keyset_version)
                cur = self._current = replace(
                    cur,
                    recipient_keys=MappingProxyType(dict(self._base.recipient_keys)),
                    keyset_version=0,
                    keys_expire_at=None,
                )
            return cur

    def apply(self, desired: Desired, version: int) -> EffectiveCloud:
        """Make ``desired`` (validated; the twin's ``$version``) the overlay: verified, persisted, then in force.

        An operating point the box does not accept (not signed by a trusted key, older than the newest accepted
        for its bundle, a bundle not installed, a label or threshold its manifest does not allow) does not raise:
        that bundle keeps the operating point it had (``operating_points_refused`` says why, reported and logged)
        and the rest of the document applies. Raises ``keysets.KeySetError`` for a recipient key set the box does
        not accept (not signed by a trusted key, expired, older than the newest accepted), ``ValueError`` for
        ``recipient_key_ids`` naming a key not in force, ``sqlite3.Error`` when it cannot be persisted; then
        nothing changes."""
        with self._lock:
            effective = _effective(  # raises before anything is kept
                self._base,
                desired,
                version,
                self._newest,
                self._op_newest,
                self.check_operating_point,
                self._current.operating_points,
            )
            op_newest = dict(self._op_newest)
            for bundle_id, op in effective.operating_points.items():
                op_newest[bundle_id] = (op.version, operating_points.canonical_content(op))
            newest = self._newest
            if effective.keyset_version and desired.recipient_keyset is not None:
                newest = (
                    effective.keyset_version,
                    keysets.canonical_content(keysets.parse(desired.recipient_keyset)[1]),
                )
            # persisted: the signed documents in force, never a refused one (it would be judged again at start)
            op_docs = {
                b: (self._op_docs[b] if b in effective.operating_points_refused else d)
                for b, d in (desired.operating_points or {}).items()
                if b in effective.operating_points
            }
            doc = desired.model_dump(exclude_none=True)
            if desired.operating_points is not None:
                doc["operating_points"] = op_docs
            with self._store.transaction() as conn:
                conn.execute(
                    "INSERT INTO settings_overlay(id, version, doc, applied_at, keyset_version, keyset_content,"
                    " operating_points_newest) VALUES (1,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET"
                    " version=excluded.version, doc=excluded.doc, applied_at=excluded.applied_at,"
                    " keyset_version=excluded.keyset_version, keyset_content=excluded.keyset_content,"
                    " operating_points_newest=excluded.operating_points_newest",
                    (
                        version,
                        json.dumps(doc, sort_keys=True),
                        time.time(),
                        newest[0] if newest else 0,
                        newest[1] if newest else None,
                        json.dumps({k: list(v) for k, v in sorted(op_newest.items())}),
                    ),
                )
            self._current, self._newest, self._op_newest = effective, newest, op_newest
            self._op_docs = op_docs
            current = self._current
        self._apply_log_level(current)
        log.info(
            "settings overlay applied",
            version=version,
            keys=sorted(doc),
            keyset_version=current.keyset_version,
            recipients=sorted(current.recipient_keys),
            operating_points={b: op.version for b, op in current.operating_points.items()},
        )
        for bundle_id, reason in current.operating_points_refused.items():
            log.warning("operating point refused; the one in force stays", bundle=bundle_id, reason=reason)
        return current

    @staticmethod
    def _apply_log_level(current: EffectiveCloud) -> None:
        if current.log_level is not None:
            logging.getLogger().setLevel(current.log_level)
