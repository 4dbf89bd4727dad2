"""Study assembly: decides when a received study is complete and records the transition.

Rule: a study revision becomes ``complete`` when no association that delivered to it is still open
(``assoc_open = 0``: released, aborted or dropped) and no instance arrived for ``quiet_seconds``.
The database is the source of truth, so the rule holds across restarts; the thread only decides
*when* to look. After each transition commits, every callable in ``on_complete`` is called with the
study row id (the pipeline's low-latency hook); a failing hook is logged and never undoes the state.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from appliance.logs import get_logger
from appliance.store import COMPLETE, RECEIVED, Store, now

log = get_logger(__name__)

MAX_SLEEP_S = 1.0  # re-check at least this often, whatever the wake-ups say


class StudyAssembler:
    """Service that completes quiet studies; ``poke()`` it when an association closes."""

    name = "study-assembler"

    def __init__(self, store: Store, quiet_seconds: float):
        self.store = store
        self.quiet_seconds = quiet_seconds
        self.on_complete: list[Callable[[int], None]] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="study-assembler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def poke(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.complete_due()
                delay = self._next_delay()
            except Exception:
                log.exception("study assembler pass failed; retrying")
                delay = MAX_SLEEP_S
            self._wake.wait(timeout=delay)
            self._wake.clear()

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
                self.store.set_study_state(conn, sid, COMPLETE, f"{cur['n']} instances")
                conn.execute("UPDATE studies SET completed_at=? WHERE id=?", (now(), sid))
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
