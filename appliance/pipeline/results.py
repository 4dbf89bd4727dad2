"""Build the result objects of one analysis and make them durable: files, rows, export queue, state.

Files are written to ``<state>/results/<study uid>/<bundle>-<version>/`` (temp file, fsync, rename) before
the one transaction that records them, queues their export (PACS destinations and, with ``cloud.enabled``,
the encrypted result message in the cloud outbox) and moves the study to ``inferred``. A crash
before that commit leaves the study ``complete`` (reprocessed on restart, same UIDs); after it, the export
queue carries on.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydicom.dataset import Dataset

from appliance.config import Settings
from appliance.logs import get_logger
from appliance.pipeline import cloud_link
from appliance.pipeline.analyse import Analysis
from appliance.pipeline.results_sc import build_sc
from appliance.pipeline.results_sr import build_sr
from appliance.store import INFERRED, Store, now
from engines.manifest import Manifest

log = get_logger(__name__)


# Result building runs on a few threads: Pillow drawing, numpy resampling and fsync release the GIL, so the
# SCs of a 4-view study, the SR (pure Python, highdicom) and the file writes overlap instead of queueing.
_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="results")


def build_objects(analysis: Analysis, manifest: Manifest, sc_max_size: int = 1024) -> list[tuple[str, Dataset]]:
    """[("SR", sr), ("SC", sc), ...] for one study and bundle (SCs built concurrently with the SR)."""
    res = analysis.result
    scs = [
        _POOL.submit(build_sc, img, src, prep.display, res, i, sc_max_size, prep.display_factor)
        for i, (img, src, prep) in enumerate(zip(res.images, analysis.sources, analysis.prepared, strict=True))
    ]
    sr = build_sr(res, analysis.sources, manifest.title)  # on this thread meanwhile
    return [("SR", sr), *(("SC", f.result()) for f in scs)]


def write_dataset(ds: Dataset, path: Path) -> None:
    """Atomic, durable write of one DICOM file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        ds.save_as(fh, enforce_file_format=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_objects(objects: list[tuple[str, Dataset]], out_dir: Path) -> list[tuple[str, Dataset, Path]]:
    """Write every object (concurrently: each fsync waits on the disk, not on the others), then the dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [(kind, ds, out_dir / f"{kind.lower()}-{ds.SOPInstanceUID}.dcm") for kind, ds in objects]
    for f in [_POOL.submit(write_dataset, ds, path) for _, ds, path in written]:
        f.result()
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def result_dir(settings: Settings, study_uid: str, manifest: Manifest) -> Path:
    return settings.results_dir / study_uid / f"{manifest.bundle_id}-{manifest.version}"


def save_results(
    settings: Settings,
    store: Store,
    study_id: int,
    analysis: Analysis,
    manifest: Manifest,
    objects: list[tuple[str, Dataset]] | None = None,
    set_state: bool = True,
) -> int:
    """Write the objects, record them, queue their export to every destination; returns the result id."""
    res = analysis.result
    objects = objects if objects is not None else build_objects(analysis, manifest, settings.pipeline.sc_max_size)
    out_dir = result_dir(settings, res.study_instance_uid, manifest)
    written = write_objects(objects, out_dir)
    summary = res.summary()
    summary["skipped"] = [{"image_sop_uid": s, "reason": r} for s, r in analysis.skipped]
    summary["objects"] = [{"kind": k, "sop_uid": str(ds.SOPInstanceUID), "path": str(p)} for k, ds, p in written]
    revision = store.query("SELECT revision FROM studies WHERE id=?", (study_id,))[0]["revision"]
    try:  # encrypt before the transaction; a cloud problem must not keep the findings from the PACS
        message = cloud_link.build_cloud_message(settings, summary, revision)
    except Exception as exc:
        message = None
        log.error("cloud result message not built", study_uid=res.study_instance_uid, error=str(exc))
    ts = now()
    with store.transaction() as conn:
        known = conn.execute(
            "SELECT 1 FROM results WHERE study_id=? AND bundle_id=? AND bundle_version=?",
            (study_id, manifest.bundle_id, manifest.version),
        ).fetchone()
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
                str(out_dir),
                json.dumps(analysis.timings),
                ts,
            ),
        )
        result_id = conn.execute(
            "SELECT id FROM results WHERE study_id=? AND bundle_id=? AND bundle_version=?",
            (study_id, manifest.bundle_id, manifest.version),
        ).fetchone()[0]
        for kind, ds, path in written:
            conn.execute(
                "INSERT OR IGNORE INTO result_objects(result_id, kind, sop_instance_uid, sop_class_uid, path)"
                " VALUES (?,?,?,?,?)",
                (result_id, kind, str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(path)),
            )
        for dest in settings.pipeline.destinations:
            conn.execute(
                "INSERT OR IGNORE INTO exports(object_id, study_id, destination, next_attempt_at, created_at)"
                " SELECT id, ?, ?, ?, ? FROM result_objects WHERE result_id=?",
                (study_id, dest.name, ts, ts, result_id),
            )
        if not known:  # a re-run of the same revision was already queued (same message id) with its result
            cloud_link.enqueue(settings, conn, message)
        if set_state:
            detail = f"{manifest.bundle_id} {manifest.version}: study score {res.study_score:.3f}"
            store.set_study_state(conn, study_id, INFERRED, detail)
    log.info(
        "results stored",
        study_uid=res.study_instance_uid,
        bundle=manifest.bundle_id,
        version=manifest.version,
        objects=len(written),
        study_score=round(res.study_score, 4),
    )
    return result_id
