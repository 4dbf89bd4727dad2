"""Startup recovery: every study revision left in a transient state is resumed or ended, with the reason recorded.

Run once when the pipeline starts (before its worker takes any study), in one transaction:

- ``inferring`` (the process died mid-inference): back to ``complete`` for another attempt, or ``failed``
  once it has used ``pipeline.max_attempts`` (a study that kills the process every time ends there instead
  of crashing the daemon at every restart);
- ``complete`` with its attempts used up: ``failed``; the others are left for the worker (resumed);
- ``inferred`` with nothing pending: ``exported`` when every export row is done; its objects queued when
  destinations are configured now but none were when it was inferred; with no destination at all it stays
  ``inferred`` (settled: retention purges it).
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.core.config import Settings
from appliance.core.logs import get_logger
from appliance.core.store import Store
from appliance.delivery.export import mark_if_exported, pending_count
from appliance.lifecycle import studies
from appliance.lifecycle.studies import COMPLETE, FAILED, INFERRED, INFERRING
from appliance.pipeline.results import queue_unqueued_objects

log = get_logger(__name__)


@dataclass
class Recovered:
    """How many revisions recovery moved, by what it did."""

    retried: int = 0  # inferring -> complete
    failed: int = 0  # inferring or complete -> failed (attempts used up)
    waiting: int = 0  # complete, left for the worker
    exported: int = 0  # inferred -> exported (every export already done)
    requeued: int = 0  # inferred: objects queued for destinations configured since

    @property
    def interrupted(self) -> int:
        """Revisions that were ``inferring``."""
        return self.retried + self.failed


def recover(settings: Settings, store: Store) -> Recovered:
    """Resume or end every transient revision (see the module doc); returns the counts."""
    out = Recovered()
    max_attempts = settings.pipeline.max_attempts
    with store.transaction() as conn:
        for r in conn.execute("SELECT id FROM studies WHERE state=? ORDER BY id", (INFERRING,)).fetchall():
            state = studies.retry_or_fail(conn, r["id"], "interrupted during inference", max_attempts)
            if state == FAILED:
                out.failed += 1
            else:
                out.retried += 1
        for r in conn.execute("SELECT id, attempts, detail FROM studies WHERE state=? ORDER BY id", (COMPLETE,)):
            if r["attempts"] < max_attempts:
                out.waiting += 1
                continue
            last = f" (last: {r['detail']})" if r["detail"] else ""
            studies.transition(conn, r["id"], COMPLETE, FAILED, f"gave up after {r['attempts']} attempt(s){last}")
            out.failed += 1
        for r in conn.execute("SELECT id FROM studies WHERE state=? ORDER BY id", (INFERRED,)).fetchall():
            queued, pending = pending_count(conn, r["id"])
            if queued and not pending:
                out.exported += mark_if_exported(conn, r["id"])
            elif not queued and settings.pipeline.destinations:
                out.requeued += queue_unqueued_objects(conn, settings, r["id"]) > 0
    if out.interrupted or out.failed or out.exported or out.requeued:
        log.info(
            "studies recovered at startup",
            retried=out.retried,
            failed=out.failed,
            waiting=out.waiting,
            exported=out.exported,
            requeued=out.requeued,
        )
    return out
