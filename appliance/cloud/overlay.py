"""Runtime cloud settings: the config file's ``[cloud]`` section overlaid by the twin's desired properties.

The ``Settings`` object read from the config file is never mutated. What the central team may change at run
time through the twin (``Desired`` in :mod:`appliance.cloud.twin`: health interval, result upload on/off, log
level, outbox TTL, recipient keys) is applied here as an explicit overlay:

- **validated**: only a whole ``Desired`` document that passed validation is applied;
- **versioned**: each applied overlay carries the twin's desired ``$version`` it came from (``TwinState``
  decides the order: only newer patches, and the full twin after each connect, which is authoritative even
  when its version is lower, e.g. a device identity re-created in the hub);
- **persisted**: the one copy lives in the ``settings_overlay`` table (this module is its only writer), so
  it survives restarts before the hub is reachable again;
- **read through one locked accessor**: :meth:`CloudOverlay.current` returns an immutable
  :class:`EffectiveCloud` snapshot; readers on other threads (pipeline, sender, health) never see half an
  update.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from appliance.cloud.twin import Desired, validate
from appliance.core.config import CloudConfig
from appliance.core.logs import get_logger
from appliance.core.store import Store

log = get_logger(__name__)


@dataclass(frozen=True)
class EffectiveCloud:
    """The cloud settings in force: config-file values with the applied overlay on top.

    ``version`` is the twin desired ``$version`` of the applied overlay (0: none applied, config only).
    ``recipient_keys`` maps key id -> base64 X25519 public key (read-only mapping).
    """

    version: int
    health_interval_s: float  # seconds between health messages
    upload_results: bool
    log_level: str | None  # None: the config file's log.level stays
    outbox_ttl_days: int
    recipient_keys: Mapping[str, str]

    @property
    def outbox_ttl_s(self) -> float:
        return self.outbox_ttl_days * 86400.0


def _effective(base: CloudConfig, desired: Desired | None, version: int) -> EffectiveCloud:
    d = desired or Desired()
    return EffectiveCloud(
        version=version,
        health_interval_s=d.health_interval_s or base.health_interval_s,
        upload_results=base.upload_results if d.upload_results is None else d.upload_results,
        log_level=d.log_level,
        outbox_ttl_days=d.outbox_ttl_days or base.outbox_ttl_days,
        recipient_keys=MappingProxyType(dict(d.recipient_keys or base.recipient_keys)),
    )


class CloudOverlay:
    """Owner of the runtime overlay (table ``settings_overlay``) and its one accessor.

    Construction reads the persisted overlay (an invalid stored document, e.g. after a downgrade that no
    longer knows a key, is ignored with a warning: the config file's values apply).
    """

    def __init__(self, base: CloudConfig, store: Store):
        self._base = base
        self._store = store
        self._lock = threading.Lock()
        row = store.query("SELECT version, doc FROM settings_overlay WHERE id=1")
        desired, version = None, 0
        if row:
            try:
                desired, version = validate(json.loads(row[0]["doc"])), int(row[0]["version"])
            except ValueError as exc:
                log.warning("stored settings overlay ignored: no longer valid", reason=str(exc))
        self._current = _effective(base, desired, version)
        self._apply_log_level(self._current)

    def current(self) -> EffectiveCloud:
        """The settings in force now (an immutable snapshot)."""
        with self._lock:
            return self._current

    def apply(self, desired: Desired, version: int) -> EffectiveCloud:
        """Make ``desired`` (validated; the twin's ``$version``) the overlay: persisted, then in force.

        Raises ``sqlite3.Error`` when it cannot be persisted (then nothing changes)."""
        with self._lock:
            doc = desired.model_dump(exclude_none=True)
            with self._store.transaction() as conn:
                conn.execute(
                    "INSERT INTO settings_overlay(id, version, doc, applied_at) VALUES (1,?,?,?) ON CONFLICT(id) "
                    "DO UPDATE SET version=excluded.version, doc=excluded.doc, applied_at=excluded.applied_at",
                    (version, json.dumps(doc, sort_keys=True), time.time()),
                )
            self._current = _effective(self._base, desired, version)
            current = self._current
        self._apply_log_level(current)
        log.info("settings overlay applied", version=version, keys=sorted(doc))
        return current

    @staticmethod
    def _apply_log_level(current: EffectiveCloud) -> None:
        if current.log_level is not None:
            logging.getLogger().setLevel(current.log_level)
