"""The bundle statistics' cloud side: ``stats/v1`` snapshots through the outbox, once per ended UTC day (``final``)
and on demand (the ``send_stats`` direct method), and the drift watch that re-evaluates each active bundle
version's window as days roll and tells the twin when the drift alerts change.

:class:`StatsService` is a Service of the daemon (``appliance/app/compose.py`` wires it): a
:class:`~appliance.core.background.BackgroundLoop` named ``stats`` that every :data:`POLL_S` seconds (and when
woken, after each stored result) re-evaluates drift (``appliance.models.stats.evaluate_drift``), calls
``on_drift_change`` when the alerts changed (the cloud agent's ``report_changed``: the reported ``drift``
property), and, with cloud sync, queues the final snapshot of every ended day not sent yet (encrypted as results
are, :func:`appliance.cloud.payload.build_stats_message`; the snapshot and its ``bundle_stats_final`` mark in one
transaction, so each goes once). Without cloud sync it only watches drift.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from typing import Any

from appliance.cloud import deid, outbox, payload
from appliance.cloud.overlay import CloudOverlay
from appliance.core.background import BackgroundLoop
from appliance.core.config import Settings
from appliance.core.logs import get_logger
from appliance.core.store import Store
from appliance.models import stats
from engines.manifest import Manifest

log = get_logger(__name__)

POLL_S = 300.0  # drift re-evaluation and the end-of-day check; woken sooner after each stored result


def _iso_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class StatsService:
    """Snapshots to the cloud and the drift watch (a Service: ``name``, ``start()``, ``stop()``)."""

    name = "stats"

    def __init__(
        self,
        settings: Settings,
        store: Store,
        manifests: Callable[[], list[Manifest]],
        overlay: CloudOverlay | None = None,
        on_queued: Callable[[], None] = lambda: None,
        on_drift_change: Callable[[], None] = lambda: None,
        poll_s: float = POLL_S,
    ):
        """``manifests()``: the active bundles' manifests (their references and drift policies); ``overlay``: the
        cloud settings in force (recipient keys, outbox TTL), None without cloud sync (nothing is sent);
        ``on_queued``: the outbox sender's ``notify_queued``; ``on_drift_change``: the agent's ``report_changed``."""
        self._settings = settings
        self._store = store
        self._manifests = manifests
        self._overlay = overlay
        self.on_queued = on_queued
        self.on_drift_change = on_drift_change
        self._loop = BackgroundLoop("stats", self.step, poll_s)
        self._lock = threading.Lock()  # one pass or one on-demand send at a time
        self._last_alerts: dict[str, bool] | None = None
        self.last_error: str | None = None

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()

    def wake(self) -> None:
        """A result was stored: look at drift (and the day) now."""
        self._loop.wake()

    def status(self) -> dict[str, Any]:
        return {"drift_alerts": stats.drift_alerts(self._store.conn, self._active()), "last_error": self.last_error}

    def _active(self) -> list[tuple[str, str]]:
        return [(m.bundle_id, m.version) for m in self._manifests()]

    # -- the loop ----------------------------------------------------------------------------------------------
    def step(self) -> None:
        """One pass: re-evaluate drift of each active bundle version, report a change, queue ended days."""
        with self._lock:
            today = stats.utc_day()
            manifests = self._manifests()
            with self._store.transaction() as conn:
                for m in manifests:
                    stats.evaluate_drift(conn, m, today)
                report = stats.drift_report(conn, [(m.bundle_id, m.version) for m in manifests])
            alerts = {name: bool(entry["alert"]) for name, entry in report.items()}
            if alerts != self._last_alerts:
                if any(alerts.values()):
                    log.warning("bundle drift against its reference", bundles=sorted(k for k, v in alerts.items() if v))
                self._last_alerts = alerts
                self.on_drift_change()
            if self._overlay is not None:
                queued = self._finalise(today)
                if queued:
                    self.on_queued()

    def _finalise(self, today: str) -> int:
        with self._store.transaction() as conn:
            due = stats.days_to_finalise(conn, today)
        queued = 0
        for bundle_id, version, day in due:
            try:
                queued += self._queue(bundle_id, version, day, final=True)[1]
            except Exception as exc:  # one bad day must not stop the others (it is retried next pass)
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.error("stats snapshot not queued", bundle=bundle_id, version=version, day=day, error=str(exc))
        return queued

    def _queue(self, bundle_id: str, version: str, day: str, *, final: bool) -> tuple[str, int]:
        """Build, encrypt and queue one snapshot (outside the write lock, then one transaction); returns its
        message id and 1 if it was queued. A final snapshot is marked sent in the same transaction."""
        assert self._overlay is not None
        with self._store.transaction() as conn:
            doc = stats.snapshot(conn, bundle_id, version, day, final=final, generated_at=_iso_now())
        secret = deid.load_or_create_device_secret(self._settings.secrets_dir)
        cur = self._overlay.current()
        mid, body = payload.build_stats_message(doc, self._settings, secret, recipient_keys=cur.recipient_keys)
        with self._store.transaction() as conn:
            added = outbox.enqueue(
                conn,
                kind="stats",
                message_id=mid,
                body=body,
                ttl_s=cur.outbox_ttl_s,
                max_bytes=self._settings.cloud.outbox_max_bytes,
            )
            if final:
                stats.mark_final(conn, bundle_id, version, day, mid)
        log.info("stats snapshot queued", bundle=bundle_id, version=version, day=day, final=final, message_id=mid)
        return mid, int(added)

    # -- on demand ---------------------------------------------------------------------------------------------
    def send_now(self, day: str | None = None, bundle_id: str | None = None) -> list[dict[str, Any]]:
        """Queue a snapshot of ``day`` (default today, UTC) for every bundle version with aggregates that day
        (only ``bundle_id``'s when given): ``final`` when the day has ended. Returns one entry per message
        ({bundle_id, bundle_version, day, final, message_id}). Raises RuntimeError without cloud sync."""
        if self._overlay is None:
            raise RuntimeError("cloud sync is off: no stats are sent")
        today = stats.utc_day()
        day = day or today
        with self._lock:
            with self._store.transaction() as conn:
                pairs = stats.bundle_versions(conn, day)
                pairs = [
                    (b, v)
                    for b, v in pairs
                    if (bundle_id is None or b == bundle_id)
                    and conn.execute(
                        "SELECT 1 FROM bundle_stats WHERE bundle_id=? AND bundle_version=? AND day=? LIMIT 1",
                        (b, v, day),
                    ).fetchone()
                ]
            sent = []
            for b, v in pairs:
                final = day < today
                mid, _ = self._queue(b, v, day, final=final)
                sent.append({"bundle_id": b, "bundle_version": v, "day": day, "final": final, "message_id": mid})
        if sent:
            self.on_queued()
        return sent

    def send_stats_method(self, request: Any) -> tuple[int, Any]:
        """Direct method ``send_stats``: ``{}`` or ``{"day": "YYYY-MM-DD", "bundle_id": "..."}`` (both optional) ->
        200 ``{"queued": [...]}`` (an empty list when that day has no aggregates); 400 for a bad payload."""
        if request in (None, "", {}):
            request = {}
        if not isinstance(request, dict) or set(request) - {"day", "bundle_id"}:
            return 400, {"error": 'payload must be {} or {"day": "YYYY-MM-DD", "bundle_id": "<bundle id>"}'}
        day, bundle_id = request.get("day"), request.get("bundle_id")
        if day is not None:
            try:
                if not isinstance(day, str) or dt.date.fromisoformat(day).isoformat() != day:
                    raise ValueError(day)
            except ValueError:
                return 400, {"error": f"day must be a date YYYY-MM-DD: {day!r}"}
            if day > stats.utc_day():
                return 400, {"error": f"day {day} has not begun (UTC)"}
        if bundle_id is not None and not isinstance(bundle_id, str):
            return 400, {"error": "bundle_id must be a string"}
        return 200, {"queued": self.send_now(day, bundle_id)}
