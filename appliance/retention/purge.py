"""Retention: patient data is kept no longer than needed, and every path to the purge ends.

A study revision whose pipeline work is settled (exported, no model, not processable, failed,
superseded, or inferred with nothing left to export) for longer than ``retention.days`` is purged: its
spool files and result files are deleted, its instance rows, result objects and export rows removed,
the result's findings kept with the patient block dropped (for statistics), and the study moves to
``purged`` with what was removed in the event detail. Cloud messages are not waited for: the outbox
holds its own encrypted, de-identified copy. Each purge is logged. Deleting the instance rows also
means a modality re-sending the study later gets it stored and analysed again, not taken for a duplicate.

So that nothing is kept for ever, each pass also:

- ends ``failed`` a revision stuck in ``received``, ``complete`` or ``inferring`` for ``retention.stalled_days``
  (it is then purged like any failed study);
- gives up exports still pending ``retention.undeliverable_days`` after they were queued
  (``delivery.export.give_up_undeliverable``), so their study settles; status and the health message report
  exports given up or pending over ``retention.export_alert_hours`` (count and oldest age);
- deletes orphan files: files under ``results/`` that no ``result_objects`` row names, and non-empty spool
  files no ``instances`` row names, older than ``retention.orphan_grace_s`` (files are written before the
  transaction that records them, hence the grace).

Every path comes from the database relative to the state directory and is resolved with
``appliance.core.safe_names.resolve_under``: nothing outside the results (or spool) folder is ever deleted; rows
that migration 0009 flagged as outside the state directory are left, and counted as ``kept_outside``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from appliance.core.audit import FAILURE, SUCCESS, AuditEvent, record_event
from appliance.core.background import BackgroundLoop
from appliance.core.config import Settings
from appliance.core.logs import get_logger
from appliance.core.safe_names import UnsafePath, resolve_under
from appliance.core.store import Store, now
from appliance.delivery.export import GAVE_UP, forget_study, give_up_undeliverable
from appliance.ingest.records import forget_study_instances, known_paths
from appliance.ingest.spool import remove_leftovers
from appliance.lifecycle import studies
from appliance.lifecycle.studies import COMPLETE, FAILED, INFERRED, INFERRING, PURGED, RECEIVED, SETTLED_STATES
from appliance.pipeline.results import purge_study_results

log = get_logger(__name__)

STALLABLE = (RECEIVED, COMPLETE, INFERRING)

# Settled: nothing more will happen to the revision's files. An ``inferred`` study is settled when it has
# no export still to deliver (e.g. no PACS destination is configured, or every one left was given up).
_SETTLED_SQL = (
    "(state IN ({marks}) OR (state = ? AND NOT EXISTS "
    "(SELECT 1 FROM exports e WHERE e.study_id = studies.id AND e.state NOT IN ('done', '{gave_up}'))))"
).format(marks=",".join("?" * len(SETTLED_STATES)), gave_up=GAVE_UP)
_SETTLED_ARGS = (*SETTLED_STATES, INFERRED)


def due_studies(store: Store, days: float, at: float | None = None) -> list[int]:
    cutoff = (now() if at is None else at) - days * 86400
    rows = store.query(
        f"SELECT id FROM studies WHERE {_SETTLED_SQL} AND updated_at < ? ORDER BY id", (*_SETTLED_ARGS, cutoff)
    )
    return [r["id"] for r in rows]


def _remove(path: Path) -> int:
    """Delete a file or folder (never following a symbolic link); returns how many files went. A missing one
    is already purged."""
    if path.is_dir() and not path.is_symlink():
        n = sum(1 for p in path.rglob("*") if p.is_file())
        shutil.rmtree(path, ignore_errors=True)
        return n
    try:
        path.unlink()
        return 1
    except FileNotFoundError:
        return 0


def _inside_results(settings: Settings, stored: str) -> Path:
    """A stored result path, resolved under the state directory and required to lie in ``results/``."""
    path = resolve_under(settings.state_dir, stored)
    resolve_under(settings.results_dir, os.path.relpath(path, settings.results_dir))  # raises when outside results/
    return path


def purge_study(settings: Settings, store: Store, study_id: int) -> dict[str, int]:
    """Delete one settled revision's files, then its rows, in that order (a crash in between re-runs cleanly)."""
    instances = store.query("SELECT id, path FROM instances WHERE study_id=?", (study_id,))
    results = store.query("SELECT id, dir, dir_outside FROM results WHERE study_id=?", (study_id,))
    removed = {"instance_files": 0, "result_files": 0, "kept_outside": 0}
    for r in instances:
        try:
            removed["instance_files"] += _remove(resolve_under(settings.spool_dir, r["path"]))
        except UnsafePath as exc:
            removed["kept_outside"] += 1
            log.warning("instance path outside the spool left alone", study_id=study_id, error=str(exc))
    for r in results:
        if r["dir_outside"]:
            removed["kept_outside"] += 1
            continue
        try:
            target = _inside_results(settings, r["dir"])
        except UnsafePath as exc:
            removed["kept_outside"] += 1
            log.warning("result path outside results/ left alone", study_id=study_id, error=str(exc))
            continue
        removed["result_files"] += _remove(target)
        with contextlib.suppress(OSError):  # the study's folder, once its last bundle folder went
            if target.parent != settings.results_dir:
                target.parent.rmdir()
    with store.transaction() as conn:
        state = conn.execute(
            f"SELECT state FROM studies WHERE id=? AND {_SETTLED_SQL}", (study_id, *_SETTLED_ARGS)
        ).fetchone()
        if state is None:
            return removed  # moved on meanwhile (e.g. a resend re-queued its exports): leave it
        forget_study(conn, study_id)  # export rows first: they refer to the result objects
        purge_study_results(conn, study_id)
        forget_study_instances(conn, study_id)
        detail = (
            f"retention {settings.retention.days:g} d: {removed['instance_files']} received file(s), "
            f"{removed['result_files']} result file(s) deleted"
            + (
                f"; {removed['kept_outside']} path(s) outside the state directory left"
                if removed["kept_outside"]
                else ""
            )
        )
        studies.transition(conn, study_id, state["state"], PURGED, detail)
    # empty study folders in the spool go too
    for r in instances:
        with contextlib.suppress(UnsafePath, OSError):
            parent = resolve_under(settings.spool_dir, r["path"]).parent
            if parent != settings.spool_dir and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
    log.info("study purged", study_id=study_id, **removed)
    return removed


def end_stalled(settings: Settings, store: Store, at: float | None = None) -> list[int]:
    """End ``failed`` every revision in received/complete/inferring unchanged for ``retention.stalled_days``;
    returns their ids (purged later like any failed study)."""
    days = settings.retention.stalled_days
    cutoff = (now() if at is None else at) - days * 86400
    marks = ",".join("?" * len(STALLABLE))
    ended = []
    for r in store.query(
        f"SELECT id, state FROM studies WHERE state IN ({marks}) AND updated_at < ?", (*STALLABLE, cutoff)
    ):
        try:
            with store.transaction() as conn:
                studies.transition(conn, r["id"], r["state"], FAILED, f"stalled in {r['state']} for over {days:g} d")
            ended.append(r["id"])
            log.warning("stalled study ended", study_id=r["id"], state=r["state"], days=days)
        except studies.LostRace:
            continue  # it moved meanwhile: not stalled
    return ended


def give_up_exports(settings: Settings, store: Store, at: float | None = None) -> list[int]:
    """Give up exports pending ``retention.undeliverable_days`` (their studies settle); returns the studies."""
    cutoff = (now() if at is None else at) - settings.retention.undeliverable_days * 86400
    with store.transaction() as conn:
        concerned = give_up_undeliverable(conn, cutoff)
    for study_id in concerned:
        log.warning("exports undeliverable: given up", study_id=study_id, days=settings.retention.undeliverable_days)
    return concerned


def remove_orphans(settings: Settings, store: Store, at: float | None = None) -> dict[str, int]:
    """Delete files under ``results/`` no ``result_objects`` row names, and spool files no ``instances`` row
    names, last changed more than ``retention.orphan_grace_s`` ago; then empty result folders.
    Returns ``{"result_files": n, "spool_files": n}``."""
    older_than = (now() if at is None else at) - settings.retention.orphan_grace_s
    known_spool = known_paths(store)  # read before listing: a file recorded meanwhile is younger than the grace
    known = {r["path"] for r in store.query("SELECT path FROM result_objects WHERE path_outside=0")}
    result_files = 0
    root = settings.results_dir
    if root.is_dir():
        # folder ages before anything is deleted here (deleting a file touches its folder): a folder made
        # within the grace may be one save_results is about to write into
        ages = {Path(d): Path(d).stat().st_mtime for d, _, _ in os.walk(root)}
        for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
            here = Path(dirpath)
            for name in filenames:
                f = here / name
                rel = Path(os.path.relpath(f, settings.state_dir)).as_posix()
                if rel in known:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if f.is_symlink() or f.lstat().st_mtime < older_than:
                        f.unlink()
                        result_files += 1
            if here != root and ages.get(here, older_than) < older_than:
                with contextlib.suppress(OSError):
                    here.rmdir()  # only when empty
    spool_files = remove_leftovers(settings.spool_dir, known_spool, older_than)
    if result_files or spool_files:
        log.info("orphan files removed", result_files=result_files, spool_files=spool_files)
    return {"result_files": result_files, "spool_files": spool_files}


def purge_due(settings: Settings, store: Store, at: float | None = None, *, actor: str = "system") -> list[int]:
    """One retention pass: stalled studies ended, undeliverable exports given up, every study revision past
    retention purged, orphan files removed; returns the purged study ids. A pass that purged or failed to
    purge anything is one audit entry (by ``actor``) with the counts."""
    end_stalled(settings, store, at)
    give_up_exports(settings, store, at)
    done: list[int] = []
    failed, files = 0, {"instance_files": 0, "result_files": 0, "kept_outside": 0}
    for study_id in due_studies(store, settings.retention.days, at):
        try:
            files = {k: n + files.get(k, 0) for k, n in purge_study(settings, store, study_id).items()}
            done.append(study_id)
        except OSError as exc:
            failed += 1
            log.error("purge failed; will retry", study_id=study_id, error=str(exc))
    if done or failed:
        detail = {"studies": len(done), "failed": failed, **files, "retention_days": settings.retention.days}
        record_event(store, AuditEvent.PURGE, actor=actor, outcome=FAILURE if failed else SUCCESS, detail=detail)
    try:
        remove_orphans(settings, store, at)
    except OSError as exc:
        log.error("orphan removal failed; will retry", error=str(exc))
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
