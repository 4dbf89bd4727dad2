"""Build the result objects of one analysis and make them durable: files, rows, export queue, state.

Files are written to ``<state>/results/<study>/<bundle>-<version>/`` (temp file, fsync, rename) before
the transaction that records them and queues their export. The SR goes first, alone (it is what the PACS
needs first, and what end-to-end latency is measured to): built, written and queued in its own transaction;
the SCs are rendered once it is out (or after a bounded wait). The final transaction records the SCs and queues the
encrypted cloud result message (with ``cloud.enabled``); the worker then moves the study to ``inferred``
(``appliance.lifecycle.studies``). A crash before it leaves the study ``inferring`` (-> ``complete`` on restart,
within ``pipeline.max_attempts``): reprocessed with the same UIDs, so an SR already queued or sent is not
queued again, and the result row, marked partial, still gets its cloud message. ``<study>`` is the Study Instance
UID through :func:`appliance.core.safe_names.safe_name` (a hostile UID becomes a hash, never a path), and the
paths recorded in ``results.dir`` and ``result_objects.path`` are relative to the state directory. An SC that
cannot be built is left out and named in :attr:`Saved.problems` and the summary's ``object_errors``: the SR
still goes out.

The same final transaction counts the study in the bundle statistics (``appliance.models.stats.record_study``,
once per study revision) and re-evaluates the bundle version's drift against its manifest's reference.

This module is the one writer of ``results`` and ``result_objects`` (retention purges through
:func:`purge_study_results`); export rows are queued through ``appliance.delivery.export.queue_object``.
"""

from __future__ import annotations

import io
import json
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydicom.dataset import Dataset

from appliance.core.config import PacsDestination, Settings
from appliance.core.executors import submit_or_run
from appliance.core.logs import get_logger
from appliance.core.safe_names import relative_to, safe_name
from appliance.core.store import Store, now
from appliance.delivery.export import queue_object
from appliance.models import stats
from appliance.pipeline import observe, uids
from appliance.pipeline.analyse import Analysis
from appliance.pipeline.results_notice import build_notice
from appliance.pipeline.results_sc import build_sc
from appliance.pipeline.results_sr import build_sr
from appliance.pipeline.router import Route, refused_summary
from durable import fsync_dir, write_atomic
from engines.manifest import Manifest

log = get_logger(__name__)


class QueuedMessage(Protocol):
    """A message built for the cloud (opaque to the pipeline but for its id and the study's pseudonym there,
    both recorded in the result summary's ``cloud`` block for the worklist)."""

    @property
    def message_id(self) -> str: ...

    @property
    def pseudonym(self) -> str | None: ...


class ResultPublisher(Protocol):
    """Where a stored result goes besides the PACS: the cloud outbox (``CloudResultPublisher``) or nowhere.

    ``build`` runs outside any transaction (it may encrypt) and may raise; ``enqueue`` runs inside the
    transaction that records the result; ``committed`` after that transaction has committed.
    """

    def build(self, summary: dict[str, Any], revision: int) -> QueuedMessage | None: ...

    def enqueue(self, conn: sqlite3.Connection, message: Any) -> bool: ...

    def committed(self) -> None: ...


class NoPublisher:
    """A ``ResultPublisher`` for a box without cloud sync (and ``appliance infer``): results go to the PACS only."""

    def build(self, summary: dict[str, Any], revision: int) -> None:
        return None

    def enqueue(self, conn: sqlite3.Connection, message: Any) -> bool:
        return False

    def committed(self) -> None:
        return None


def submit_scs(analysis: Analysis, sc_max_size: int, pool: Executor | None = None) -> list[Future[Dataset]]:
    """Start rendering one SC per analysed image on ``pool`` (the daemon's result pool: Pillow drawing, numpy
    resampling and fsync release the GIL, so the SCs of a 4-view study overlap); without one, render here."""
    res = analysis.result
    return [
        submit_or_run(pool, build_sc, img, src, prep.display, res, i, sc_max_size, prep.display_factor)
        for i, (img, src, prep) in enumerate(zip(res.images, analysis.sources, analysis.prepared, strict=True))
    ]


def complete_evidence(sr: Dataset, sources: list[Dataset]) -> int:
    """List every source image of the SR's study in its Current Requested Procedure Evidence Sequence (PS3.3
    C.17.2.3, Hierarchical SOP Instance Reference Macro, Table C.17-3) under its own series; returns how many
    references were added.

    highdicom's ``collect_evidence`` skips a SOP Instance UID it has seen once, so of two images that share a
    SOP Instance UID in two series (a modality re-using UIDs) the second series would be missing from the
    evidence although its image was analysed and is referenced by the content tree.
    """
    study_items = {str(item.StudyInstanceUID): item for item in sr.get("CurrentRequestedProcedureEvidenceSequence", [])}
    listed = {
        (study, str(series.SeriesInstanceUID), str(ref.ReferencedSOPInstanceUID))
        for study, item in study_items.items()
        for series in item.get("ReferencedSeriesSequence", [])
        for ref in series.get("ReferencedSOPSequence", [])
    }
    added = 0
    for src in sources:
        study, series_uid, sop = (
            str(src.StudyInstanceUID),
            str(src.get("SeriesInstanceUID", "")),
            str(src.SOPInstanceUID),
        )
        if (study, series_uid, sop) in listed or study not in study_items:
            continue  # listed already, or another study (Pertinent Other Evidence, never ours: one study per SR)
        series_items = study_items[study].ReferencedSeriesSequence
        series_item = next((s for s in series_items if str(s.SeriesInstanceUID) == series_uid), None)
        if series_item is None:
            series_item = Dataset()
            series_item.SeriesInstanceUID = series_uid
            series_item.ReferencedSOPSequence = []
            series_items.append(series_item)
        ref = Dataset()
        ref.ReferencedSOPClassUID = src.SOPClassUID
        ref.ReferencedSOPInstanceUID = sop
        series_item.ReferencedSOPSequence.append(ref)
        listed.add((study, series_uid, sop))
        added += 1
    return added


def _sr(analysis: Analysis, manifest: Manifest) -> Dataset:
    """The study's SR (``results_sr.build_sr``) with every analysed image in its evidence."""
    sr = build_sr(analysis.result, analysis.sources, manifest.title)
    complete_evidence(sr, analysis.sources)
    return sr


def result_summary(analysis: Analysis) -> dict[str, Any]:
    """The findings JSON of one analysis (``StudyResult.summary``) with the images skipped and their reasons and,
    when analysed images share a SOP Instance UID in different series, ``sop_uid_conflicts``
    (:func:`appliance.pipeline.uids.shared_sop_uids`; each image's own results, PS3.3 C.12.1.1.1)."""
    summary = analysis.result.summary()
    summary["skipped"] = [{"image_sop_uid": s, "reason": r} for s, r in analysis.skipped]
    conflicts = uids.shared_sop_uids((img.series_instance_uid, img.sop_instance_uid) for img in analysis.result.images)
    if conflicts:
        summary["sop_uid_conflicts"] = conflicts
    return summary


def build_objects(
    analysis: Analysis, manifest: Manifest, sc_max_size: int = 1024, pool: Executor | None = None
) -> list[tuple[str, Dataset]]:
    """[("SR", sr), ("SC", sc), ...] for one study and bundle (SCs built on ``pool`` concurrently with the SR)."""
    scs = submit_scs(analysis, sc_max_size, pool)
    sr = _sr(analysis, manifest)  # on this thread meanwhile
    return [("SR", sr), *(("SC", f.result()) for f in scs)]


def write_dataset(ds: Dataset, path: Path) -> None:
    """Atomic write of one DICOM file (Part 10): fsynced and renamed into place; the caller fsyncs the
    directory once for all the objects it writes (:func:`write_objects`)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    write_atomic(path, buf.getvalue(), sync_dir=False)


def write_objects(
    objects: list[tuple[str, Dataset]], out_dir: Path, pool: Executor | None = None
) -> list[tuple[str, Dataset, Path]]:
    """Write every object (on ``pool``, concurrently: each fsync waits on the disk, not on the others), then
    fsync the directory."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [(kind, ds, out_dir / f"{kind.lower()}-{safe_name(str(ds.SOPInstanceUID))}.dcm") for kind, ds in objects]
    for f in [submit_or_run(pool, write_dataset, ds, path) for _, ds, path in written]:
        f.result()
    fsync_dir(out_dir)  # every rename above, with one directory fsync
    return written


def result_dir(settings: Settings, study_uid: str, manifest: Manifest) -> Path:
    """``<results_dir>/<safe study>/<safe bundle-version>``: every component through :func:`safe_name`."""
    return settings.results_dir / safe_name(study_uid) / safe_name(f"{manifest.bundle_id}-{manifest.version}")


PARTIAL = {"partial": True}  # summary of a result whose SR is queued but whose SCs are not yet


def _result_row(conn, study_id: int, manifest: Manifest):
    return conn.execute(
        "SELECT id, summary FROM results WHERE study_id=? AND bundle_id=? AND bundle_version=?",
        (study_id, manifest.bundle_id, manifest.version),
    ).fetchone()


def _upsert_result(
    conn, settings: Settings, study_id: int, res, manifest: Manifest, summary: dict, timings: dict, out_dir: Path
) -> int:
    conn.execute(
        "INSERT INTO results(study_id, study_uid, bundle_id, bundle_version, summary, study_score, dir, timings,"
        " created_at) VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(study_id, bundle_id, bundle_version) DO UPDATE SET"
        " summary=excluded.summary, study_score=excluded.study_score, timings=excluded.timings",
        (
            study_id,
            res.study_instance_uid,
            manifest.bundle_id,
            manifest.version,
            json.dumps(summary),
            res.study_score,
            relative_to(settings.state_dir, out_dir),
            json.dumps(timings),
            now(),
        ),
    )
    return conn.execute(
        "SELECT id FROM results WHERE study_id=? AND bundle_id=? AND bundle_version=?",
        (study_id, manifest.bundle_id, manifest.version),
    ).fetchone()[0]


def _queue_objects(
    conn, settings: Settings, study_id: int, result_id: int, written: list[tuple[str, Dataset, Path]]
) -> None:
    """Record the objects and queue each for every destination (idempotent: a re-run adds nothing)."""
    ts = now()
    for kind, ds, path in written:
        conn.execute(
            "INSERT OR IGNORE INTO result_objects(result_id, kind, sop_instance_uid, sop_class_uid, path)"
            " VALUES (?,?,?,?,?)",
            (result_id, kind, str(ds.SOPInstanceUID), str(ds.SOPClassUID), relative_to(settings.state_dir, path)),
        )
        object_id = conn.execute(
            "SELECT id FROM result_objects WHERE result_id=? AND sop_instance_uid=?",
            (result_id, str(ds.SOPInstanceUID)),
        ).fetchone()[0]
        queue_object(conn, study_id, int(object_id), destinations_for(settings, kind), ts)


NOTICE = "NOTICE"  # result_objects.kind of an "AI not applied" notice (``results_notice``)


def destinations_for(settings: Settings, kind: str) -> list[PacsDestination]:
    """The PACS destinations an object of ``kind`` goes to: every configured one, except that a NOTICE goes only
    to those with ``send_ai_not_applied`` (on by default)."""
    dests = settings.pipeline.destinations
    return [d for d in dests if d.send_ai_not_applied] if kind == NOTICE else list(dests)


def queue_unqueued_objects(conn: sqlite3.Connection, settings: Settings, study_id: int) -> int:
    """Queue every recorded object of the study for the destinations configured now (startup recovery of a
    study inferred while none was configured); returns how many export rows were added."""
    rows = conn.execute(
        "SELECT o.id, o.kind FROM result_objects o JOIN results r ON r.id=o.result_id WHERE r.study_id=?", (study_id,)
    ).fetchall()
    return sum(queue_object(conn, study_id, int(r["id"]), destinations_for(settings, r["kind"]), now()) for r in rows)


def save_notices(
    settings: Settings, store: Store, study_id: int, routes: list[Route], pool: Executor | None = None
) -> list[str]:
    """A study the gate refused whole (``router.gated`` routes, each with its refused images): per bundle, build
    and write the "AI not applied" Secondary Capture (``results_notice.build_notice``), record a ``results`` row
    (summary ``{"not_analysed": true, "not_applied": [...], "findings": []}``, no score) with the notice as a
    ``NOTICE`` object, and queue it for every destination with ``send_ai_not_applied``, in one transaction;
    idempotent (same UIDs on a re-run). The study's state is the caller's. Returns the problems (a notice whose
    builder raised is left out, logged; the study is still ``not_analysed``)."""
    problems: list[str] = []
    for r in routes:
        try:
            notice = build_notice(r.manifest, r.refused)
        except Exception as exc:
            problems.append(f"{r.manifest.bundle_id}: notice not built: {type(exc).__name__}: {exc}")
            log.exception("AI not applied notice not built", study_id=study_id, bundle=r.manifest.bundle_id)
            continue
        study_uid = str(notice.StudyInstanceUID)
        out_dir = result_dir(settings, study_uid, r.manifest)
        written = write_objects([(NOTICE, notice)], out_dir, pool)
        summary = {
            "study_uid": study_uid,
            "bundle_id": r.manifest.bundle_id,
            "bundle_version": r.manifest.version,
            "task": r.manifest.task,
            "clinical_use": r.manifest.clinical_use,
            "not_analysed": True,
            "findings": [],
            "urgent": [],
            "images": [],
            "not_applied": refused_summary(r.refused),
            "objects": [
                {"kind": k, "sop_uid": str(ds.SOPInstanceUID), "path": relative_to(settings.state_dir, p)}
                for k, ds, p in written
            ],
        }
        with store.transaction() as conn:
            conn.execute(
                "INSERT INTO results(study_id, study_uid, bundle_id, bundle_version, summary, study_score, dir,"
                " timings, created_at) VALUES (?,?,?,?,?,NULL,?,?,?) ON CONFLICT(study_id, bundle_id,"
                " bundle_version) DO UPDATE SET summary=excluded.summary, study_score=NULL",
                (
                    study_id,
                    study_uid,
                    r.manifest.bundle_id,
                    r.manifest.version,
                    json.dumps(summary),
                    relative_to(settings.state_dir, out_dir),
                    json.dumps({}),
                    now(),
                ),
            )
            result_id = _result_row(conn, study_id, r.manifest)["id"]
            _queue_objects(conn, settings, study_id, result_id, written)
        log.info("AI not applied notice stored", study_id=study_id, bundle=r.manifest.bundle_id, images=len(r.refused))
    return problems


def purge_study_results(conn: sqlite3.Connection, study_id: int) -> int:
    """Retention, in the caller's transaction (after the export rows went): delete the study's result
    objects and drop the patient block from each result's findings (kept for statistics) and the reason text of
    each image the gate refused (its category stays: it may state the patient's age). Objects flagged
    ``path_outside`` (an absolute path outside the state directory, migration 0009) are kept, for the operator
    to look at. Returns how many result rows were stripped."""
    rows = conn.execute("SELECT id, summary FROM results WHERE study_id=?", (study_id,)).fetchall()
    for r in rows:
        conn.execute("DELETE FROM result_objects WHERE result_id=? AND path_outside=0", (r["id"],))
        summary = json.loads(r["summary"] or "{}")
        summary.pop("patient", None)
        for item in summary.get("not_applied") or []:  # the reason may state the patient's age: the category stays
            item.pop("reason", None)
        conn.execute("UPDATE results SET summary=? WHERE id=?", (json.dumps(summary), r["id"]))
    return len(rows)


@dataclass(frozen=True)
class Saved:
    """What :func:`save_results` stored: the ``results`` row and the objects it could not build."""

    result_id: int
    problems: list[str] = field(default_factory=list)  # e.g. "SC not built for image <uid>: ValueError: ..."


def _built_scs(analysis: Analysis, futures: list[Future]) -> tuple[list[tuple[str, Dataset]], list[dict[str, str]]]:
    """The SCs that were built, and {image_sop_uid, image_series_uid, error} for each that raised (logged,
    never fatal)."""
    built, errors = [], []
    for img, fut in zip(analysis.result.images, futures, strict=True):
        try:
            built.append(("SC", fut.result()))
        except Exception as exc:
            errors.append(
                {
                    "image_sop_uid": img.sop_instance_uid,
                    "image_series_uid": img.series_instance_uid,
                    "error": f"{type(exc).__name__}: {exc}",
                }
            )
            log.warning("SC not built", image_sop_uid=img.sop_instance_uid, error=f"{type(exc).__name__}: {exc}")
    return built, errors


def save_results(
    settings: Settings,
    store: Store,
    study_id: int,
    analysis: Analysis,
    manifest: Manifest,
    objects: list[tuple[str, Dataset]] | None = None,
    on_queued: Callable[[], object] | None = None,
    publisher: ResultPublisher | None = None,
    pool: Executor | None = None,
) -> Saved:
    """Write the objects, record them, queue their export to every destination; the study's state is the
    caller's (the worker moves it to ``inferred`` afterwards).

    Without prebuilt ``objects`` the SR goes first: it is built, written and queued for export in its own
    transaction; then ``on_queued`` is called (the daemon's waits, bounded, for the exporter to send it), then
    the SCs are rendered on the pool and follow in the final transaction. An SC whose builder raises is left
    out and reported in ``Saved.problems``. Raises whatever building the SR or writing a file raises (then
    nothing of this call is queued, or only the SR).
    ``publisher`` builds and queues the cloud result message (default: none); ``pool`` renders and writes the
    objects concurrently (default: on this thread).
    """
    publisher = publisher or NoPublisher()
    res = analysis.result
    out_dir = result_dir(settings, res.study_instance_uid, manifest)
    t0 = time.perf_counter()
    known = False  # this revision's result was complete before (its cloud message already queued)
    if objects is None:
        sr = _sr(analysis, manifest)
        first = write_objects([("SR", sr)], out_dir, pool)
        with store.transaction() as conn:
            row = _result_row(conn, study_id, manifest)
            known = row is not None and not json.loads(row["summary"]).get("partial")
            result_id = (
                row["id"]
                if row is not None
                else _upsert_result(conn, settings, study_id, res, manifest, PARTIAL, {}, out_dir)
            )
            _queue_objects(conn, settings, study_id, result_id, first)
        analysis.timings["sr_queued"] = time.perf_counter() - t0
        if on_queued is not None:
            on_queued()
        # the SCs only now: rendered beside the SR or its export (threads, one GIL) they delayed the SR more
        # than they saved; the daemon's on_queued waits (bounded) until the exporter has tried the SR
        built, object_errors = _built_scs(analysis, submit_scs(analysis, settings.pipeline.sc_max_size, pool))
        written = first + write_objects(built, out_dir, pool)
    else:
        written, object_errors = write_objects(objects, out_dir, pool), []
    summary = result_summary(analysis)
    if object_errors:
        summary["object_errors"] = object_errors
    summary["objects"] = [
        {"kind": k, "sop_uid": str(ds.SOPInstanceUID), "path": relative_to(settings.state_dir, p)}
        for k, ds, p in written
    ]
    revision = store.query("SELECT revision FROM studies WHERE id=?", (study_id,))[0]["revision"]
    try:  # encrypt before the transaction; a cloud problem must not keep the findings from the PACS
        message = publisher.build(summary, revision)
    except Exception as exc:
        message = None
        log.error("cloud result message not built", study_id=study_id, study_uid=res.study_instance_uid, error=str(exc))
    if message is not None:  # where the worklist finds the study in the outbox, and the name the cloud knows
        summary["cloud"] = {"message_id": message.message_id, "pseudonym": message.pseudonym}
    analysis.timings["results"] = time.perf_counter() - t0
    observed = observe.observation(analysis, manifest)  # numpy, outside the write lock
    with store.transaction() as conn:
        if objects is not None:
            row = _result_row(conn, study_id, manifest)
            known = row is not None and not json.loads(row["summary"]).get("partial")
        before = _result_row(conn, study_id, manifest)
        before_mid = (json.loads(before["summary"]).get("cloud") or {}).get("message_id") if before else None
        result_id = _upsert_result(conn, settings, study_id, res, manifest, summary, analysis.timings, out_dir)
        _queue_objects(conn, settings, study_id, result_id, written)
        # a re-run of the same revision was already queued (same message id) with its result; one judged by
        # another site operating point has a message id of its own (deid.result_message_id) and is queued
        if not known or (message is not None and message.message_id != before_mid):
            publisher.enqueue(conn, message)
            stats.record_study(conn, observed)  # counted once per study revision, with the result it counts
            stats.evaluate_drift(conn, manifest)
    publisher.committed()
    log.info(
        "results stored",
        study_id=study_id,
        study_uid=res.study_instance_uid,
        bundle=manifest.bundle_id,
        version=manifest.version,
        objects=len(written),
        study_score=round(res.study_score, 4),
        object_errors=len(object_errors),
    )
    problems = [f"SC not built for image {e['image_sop_uid']}: {e['error']}" for e in object_errors]
    return Saved(result_id, problems)
