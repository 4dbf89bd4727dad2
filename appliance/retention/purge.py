"""Retention: patient data is kept no longer than needed.

A study revision whose pipeline work is settled (exported, no model, not processable, failed,
superseded, or inferred with nothing left to export) for longer than ``retention.days`` is purged: its
spool files and result files are deleted, its instance rows, result objects and export rows removed,
the result's findings kept with the patient block dropped (for statistics), and the study moves to
``purged`` with what was removed in the event detail. Cloud messages are not waited for: the outbox
holds its own encrypted, de-identified copy. Each purge is logged. Deleting the instance rows also
means a modality re-sending the study later gets it stored and analysed again, not taken for a duplicate.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from appliance.core.audit import FAILURE, SUCCESS, AuditEvent, record_event
from appliance.core.background import BackgroundLoop
from appliance.core.config import Settings
from appliance.core.logs import get_logger
from appliance.core.store import Store, now
from appliance.delivery.export import forget_study
from appliance.ingest.records import forget_study_instances
from appliance.lifecycle import studies
from appliance.lifecycle.studies import INFERRED, PURGED, SETTLED_STATES
from appliance.pipeline.results import purge_study_results

log = get_logger(__name__)


# Settled: nothing more will happen to the revision's files. An ``inferred`` study is settled when it has
# no export still to deliver (e.g. no PACS destination is configured).
_SETTLED_SQL = (
    "(state IN ({marks}) OR (state = ? AND NOT EXISTS "
    "(SELECT 1 FROM exports e WHERE e.study_id = studies.id AND e.state != 'done')))"
).format(marks=",".join("?" * len(SETTLED_STATES)))
_SETTLED_ARGS = (*SETTLED_STATES, INFERRED)


def due_studies(store: Store, days: float, at: float | None = None) -> list[int]:
    cutoff = (now() if at is None else at) - days * 86400
    rows = store.query(
        f"SELECT id FROM studies WHERE {_SETTLED_SQL} AND updated_at < ? ORDER BY id", (*_SETTLED_ARGS, cutoff)
    )
    return [r["id"] for r in rows]


def _remove(path: Path) -> int:
    """Delete a file or folder; returns how many files went. A missing one is already purged."""
    if path.is_dir():
        n = sum(1 for p in path.rglob("*") if p.is_file())
        shutil.rmtree(path, ignore_errors=True)
        return n
    try:
        path.unlink()
        return 1
    except FileNotFoundError:
        return 0


def purge_study(settings: Settings, store: Store, study_id: int) -> dict[str, int]:
    """Delete one settled revision's files, then its rows, in that order (a crash in between re-runs cleanly)."""
    instances = store.query("SELECT id, path FROM instances WHERE study_id=?", (study_id,))
    results = store.query("SELECT id, dir FROM results WHERE study_id=?", (study_id,))
    removed = {"instance_files": 0, "result_files": 0}
    for r in instances:
        removed["instance_files"] += _remove(settings.spool_dir / r["path"])
    for r in results:
        removed["result_files"] += _remove(Path(r["dir"]))
    with store.transaction() as conn:
        state = conn.execute(
            f"SELECT state, study_uid FROM studies WHERE id=? AND {_SETTLED_SQL}", (study_id, *_SETTLED_ARGS)
        ).fetchone()
        if state is None:
            return removed  # moved on meanwhile (e.g. a resend re-queued its exports): leave it
        forget_study(conn, study_id)  # export rows first: they refer to the result objects
        purge_study_results(conn, study_id)
        forget_study_instances(conn, study_id)
        detail = (
            f"retention {settings.retention.days:g} d: {removed['instance_files']} received file(s), "
            f"{removed['result_files']} result file(s) deleted"
        )
        studies.transition(conn, study_id, state["state"], PURGED, detail)
    # empty study folders in the spool go too
    for r in instances:
        parent = (settings.spool_dir / r["path"]).parent
        if parent != settings.spool_dir and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
    log.info("study purged", study_id=study_id, study_uid=state["study_uid"], **removed)
    return removed


def purge_due(settings: Settings, store: Store, at: float | None = None, *, actor: str = "system") -> list[int]:
    """Purge every study revision past retention; returns their ids. A pass that purged or failed to
    purge anything is one audit entry (by ``actor``) with the counts."""
    done: list[int] = []
    failed, files = 0, {"instance_files": 0, "result_files": 0}
    for study_id in due_studies(store, settings.retention.days, at):
        try:
            files = {k: n + files[k] for k, n in purge_study(settings, store, study_id).items()}
            done.append(study_id)
        except OSError as exc:
            failed += 1
            log.error("purge failed; will retry", study_id=study_id, error=str(exc))
    if done or failed:
        detail = {"studies": len(done), "failed": failed, **files, "retention_days": settings.retention.days}
        record_event(store, AuditEvent.PURGE, actor=actor, outcome=FAILURE if failed else SUCCESS, detail=detail)
    return done


class RetentionService:
    """Daemon service: runs :func:`purge_due` every ``retention.check_interval_s``."""

    name = "retention"

    def __init__(self, settings: Settings, store: Store):
        self.settings = settings
        self.store = store
        self._loop = BackgroundLoop("retention", self._pass, settings.retention.check_interval_s)

    def _pass(self) -> None:
        purge_due(self.settings, self.store)

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()
