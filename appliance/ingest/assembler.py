"""Study assembly: decides when a received study is complete and records the transition.

Rule: a study revision becomes ``complete`` when no association that delivered to it is still open
(``assoc_open = 0``: released, aborted or dropped) and no instance arrived for ``quiet_seconds``.
The database is the source of truth, so the rule holds across restarts; the thread only decides
*when* to look. After each transition commits, every callable in ``on_complete`` is called with the
study row id (the pipeline's low-latency hook); a failing hook is logged and never undoes the state.
"""

from __future__ import annotations

from collections.abc import Callable

from appliance.core.background import BackgroundLoop
from appliance.core.logs import get_logger
from appliance.core.store import Store, now
from appliance.lifecycle import studies
from appliance.lifecycle.studies import COMPLETE, RECEIVED

log = get_logger(__name__)

MAX_SLEEP_S = 1.0  # re-check at least this often, whatever the wake-ups say


class StudyAssembler:
    """Service that completes quiet studies; ``poke()`` it when an association closes."""

    name = "study-assembler"

    def __init__(self, store: Store, quiet_seconds: float):
        self.store = store
        self.quiet_seconds = quiet_seconds
        self.on_complete: list[Callable[[int], None]] = []
        self._loop = BackgroundLoop("study-assembler", self._pass, MAX_SLEEP_S)

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()

    def poke(self) -> None:
        self._loop.wake()

    def _pass(self) -> float:
        self.complete_due()
        return self._next_delay()

    def _next_delay(self) -> float:
        row = self.store.query(
            "SELECT MIN(last_instance_at) AS t FROM studies WHERE state=? AND assoc_open=0", (RECEIVED,)
        )[0]
        if row["t"] is None:
            return MAX_SLEEP_S
        return min(MAX_SLEEP_S, max(0.01, row["t"] + self.quiet_seconds - now()))

    def complete_due(self) -> list[int]:
        """Complete every study revision that meets the rule now; returns their ids."""
        cutoff = now() - self.quiet_seconds
        due = self.store.query(
            "SELECT id FROM studies WHERE state=? AND assoc_open=0 AND last_instance_at<=? ORDER BY id",
            (RECEIVED, cutoff),
        )
        done: list[int] = []
        for row in due:
            sid = int(row["id"])
            with self.store.transaction() as conn:
                cur = conn.execute(
                    "SELECT s.study_uid, s.revision, (SELECT COUNT(*) FROM instances i WHERE i.study_id=s.id) AS n"
                    " FROM studies s WHERE s.id=? AND s.state=? AND s.assoc_open=0 AND s.last_instance_at<=?",
                    (sid, RECEIVED, now() - self.quiet_seconds),
                ).fetchone()
                if cur is None:  # an instance arrived meanwhile
                    continue
                studies.transition(conn, sid, RECEIVED, COMPLETE, f"{cur['n']} instances", completed=True)
            log.info(
                "study complete", study_id=sid, study_uid=cur["study_uid"], revision=cur["revision"], instances=cur["n"]
            )
            done.append(sid)
            for hook in list(self.on_complete):
                try:
                    hook(sid)
                except Exception:
                    log.exception("on_complete hook failed", study_id=sid, hook=getattr(hook, "__name__", hook))
        return done
