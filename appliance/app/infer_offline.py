"""``appliance infer PATH...``: the daemon's pipeline on files and folders, without network or database.

Files are grouped into studies by StudyInstanceUID, routed to the active bundles exactly as the worker
does, analysed, and (with ``--out``) the SR and SC objects are written to ``OUT/<study uid>/``.

An image is identified as in the daemon (``records.study_instances``) by its (Series Instance UID, SOP
Instance UID): two files with the same pair are copies of one image, of which the newest file (modification
time, then path order) is analysed and the others are listed in the study's ``replaced``; two images sharing
a SOP Instance UID in different series are both analysed, with distinct result UIDs, and listed in the
study's ``sop_uid_conflicts`` (and each result's).

Nothing stops the run but a path that does not exist: a file that is not readable DICOM, a study that
fails, a result object that cannot be built are each reported per file in ``errors`` (and the object in the
result's ``object_errors``), and the run goes on.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from appliance.core.config import Settings
from appliance.core.logs import get_logger
from appliance.core.safe_names import safe_name, uid_fault
from appliance.models.active import ActiveEngines
from appliance.pipeline import uids
from appliance.pipeline.analyse import Analysis, analyse_route
from appliance.pipeline.preprocess import NotProcessable
from appliance.pipeline.results import NOTICE, complete_evidence, result_summary, submit_scs, write_objects
from appliance.pipeline.results_notice import build_notice
from appliance.pipeline.results_sr import build_sr
from appliance.pipeline.router import InferenceEngine, explain, gated, not_applied_detail, refused_summary, route
from appliance.pipeline.worker import BundleSource
from engines.manifest import Manifest

log = get_logger(__name__)

POOL_THREADS = 4  # image preparation and result building overlap (decoders, numpy, Pillow release the GIL)


def collect(paths: list[Path]) -> list[Path]:
    """Every file named or under a folder named, sorted per folder; entries that are neither a file nor a
    folder (a broken link, a socket) are kept, so that reading them reports them. Raises FileNotFoundError
    for a path that does not exist."""
    files: list[Path] = []
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or folder")
        files.extend(sorted(f for f in p.rglob("*") if not f.is_dir()) if p.is_dir() else [p])
    return files


def default_bundles(settings: Settings) -> BundleSource:
    """The installed, active bundles (engines registry; reference bundles on first use), with engines."""
    return ActiveEngines(settings, install_reference=True)


def run_offline(
    settings: Settings,
    paths: list[Path],
    out: Path | None,
    bundle: str | None = None,
    bundles: BundleSource | None = None,
) -> dict[str, Any]:
    files = collect(paths)
    errors: list[dict[str, str]] = []
    read: dict[str, list[tuple[Path, Dataset]]] = {}
    for f in files:
        try:
            ds = dcmread(f)
        except (InvalidDicomError, OSError) as exc:
            errors.append({"path": str(f), "error": f"not readable as DICOM: {exc}"})
            continue
        except Exception as exc:  # a malformed file raises whatever its parser meets; the run goes on
            errors.append({"path": str(f), "error": f"not readable as DICOM: {_fault(exc)}"})
            continue
        if "StudyInstanceUID" not in ds or "SOPInstanceUID" not in ds:
            errors.append({"path": str(f), "error": "no StudyInstanceUID/SOPInstanceUID"})
            continue
        fault = _uid_fault(ds)
        if fault is not None:  # the receiver refuses such an instance (0xC214); no result may carry it
            errors.append({"path": str(f), "error": fault})
            continue
        read.setdefault(str(ds.StudyInstanceUID), []).append((f, ds))
    studies = {study_uid: one_copy_per_image(copies) for study_uid, copies in read.items()}
    source = bundles or default_bundles(settings)
    try:
        active = [(m, e) for m, e in source.active() if bundle is None or m.bundle_id == bundle]
        with ThreadPoolExecutor(max_workers=POOL_THREADS, thread_name_prefix="infer-offline") as pool:
            return _run_studies(settings, studies, active, out, errors, pool)
    finally:
        if bundles is None:
            source.close()


def _uid_fault(ds: Dataset) -> str | None:
    """Why the file's Study, Series or SOP Instance UID is not a valid UID (PS3.5 9.1), or None: the rule of
    ``appliance.ingest.header`` (pydicom has already removed the UI padding). The message never holds the UID."""
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if keyword == "SeriesInstanceUID" and not ds.get(keyword):
            continue  # absent series: stored and analysed as one series, as at receive
        fault = uid_fault(str(ds.get(keyword) or ""))
        if fault is not None:
            return f"{keyword} is not a valid UID (PS3.5 9.1): {fault}"
    return None


@dataclass
class Study:
    """One study's images for analysis, with the copies left out and the SOP Instance UIDs shared across series."""

    images: list[Dataset]
    replaced: list[dict[str, str]] = field(default_factory=list)
    sop_uid_conflicts: list[dict[str, Any]] = field(default_factory=list)


def _path(ds: Dataset) -> str:
    """The file a dataset was read from (pydicom's ``FileDataset.filename``)."""
    return str(getattr(ds, "filename", "") or "")


def _fault(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _run_studies(
    settings: Settings,
    studies: dict[str, Study],
    active: list[tuple[Manifest, InferenceEngine]],
    out: Path | None,
    errors: list[dict[str, str]],
    pool: Executor,
) -> dict[str, Any]:
    """Every study in turn; one that fails is reported (state ``failed``, each of its files in ``errors``)
    and the run goes on with the next (the daemon's contract: bad input gets a clear error, never a crash)."""
    report: dict[str, Any] = {"studies": [], "errors": errors}
    for study_uid, study in studies.items():
        try:
            entry = _run_study(settings, study_uid, study, active, out, errors, pool)
        except Exception as exc:
            reason = _fault(exc)
            log.warning("study failed offline", study_uid=study_uid, error=reason)
            entry = {"study_uid": study_uid, "results": [], "state": "failed", "reason": reason}
            errors.extend({"path": _path(ds), "error": f"study failed: {reason}"} for ds in study.images)
        report["studies"].append(entry)
    return report


def _run_study(
    settings: Settings,
    study_uid: str,
    study: Study,
    active: list[tuple[Manifest, InferenceEngine]],
    out: Path | None,
    errors: list[dict[str, str]],
    pool: Executor,
) -> dict[str, Any]:
    p = settings.pipeline
    images = study.images
    entry: dict[str, Any] = {"study_uid": study_uid, "results": [], "state": "inferred", "reason": None}
    if study.replaced:
        entry["replaced"] = study.replaced
    if study.sop_uid_conflicts:
        entry["sop_uid_conflicts"] = study.sop_uid_conflicts
    routes = route(active, images, p.routes)
    refused_whole = gated(active, images, p.routes) if not routes else []
    if refused_whole:  # a model's modality matches, its input gate refused every image: the daemon's not_analysed
        entry.update(state="not_analysed", reason="AI not applied: " + not_applied_detail(refused_whole))
        entry["not_applied"] = [
            {"bundle_id": r.manifest.bundle_id, "bundle_version": r.manifest.version, **item}
            for r in refused_whole
            for item in refused_summary(r.refused)
        ]
        if out is not None:
            entry["objects"] = [
                {"kind": NOTICE, "sop_uid": str(ds.SOPInstanceUID), "path": str(path)}
                for r in refused_whole
                for _, ds, path in write_objects(
                    [(NOTICE, build_notice(r.manifest, r.refused))],
                    out / safe_name(study_uid) / safe_name(f"{r.manifest.bundle_id}-{r.manifest.version}"),
                    pool,
                )
            ]
        return entry
    if not routes:
        entry.update(state="no_model", reason=explain(active, images, p.routes))
    reasons = []
    for r in routes:
        try:
            a = analyse_route(r, p, None, pool)
        except NotProcessable as exc:
            reasons.append(f"{r.manifest.bundle_id}: {exc.reason}")
            continue
        paths = {(str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)): _path(ds) for ds in r.images}
        by_sop = {sop: path for (_, sop), path in paths.items()}
        summary = result_summary(a)
        for sk in summary["skipped"]:
            sk["path"] = by_sop.get(sk["image_sop_uid"], "")
        summary["timings_s"] = {k: round(v, 4) for k, v in a.timings.items()}
        if out is not None:
            objects, object_errors = build_objects_reporting(a, r.manifest, p.sc_max_size, pool)
            target = out / safe_name(study_uid) / safe_name(f"{r.manifest.bundle_id}-{r.manifest.version}")
            summary["objects"] = [
                {"kind": k, "sop_uid": str(ds.SOPInstanceUID), "path": str(path)}
                for k, ds, path in write_objects(objects, target, pool)
            ]
            if object_errors:
                summary["object_errors"] = object_errors
            for e in object_errors:
                key = (e["image_series_uid"], e["image_sop_uid"])
                files = [paths.get(key, "")] if e["image_sop_uid"] else list(paths.values())
                errors.extend({"path": f, "error": f"{e['kind']} not built: {e['error']}"} for f in files)
        entry["results"].append(summary)
    if routes and not entry["results"]:
        entry.update(state="not_processable", reason="; ".join(reasons))
    elif reasons:
        entry["reason"] = "; ".join(reasons)
    return entry


def build_objects_reporting(
    analysis: Analysis, manifest: Manifest, sc_max_size: int, pool: Executor | None = None
) -> tuple[list[tuple[str, Dataset]], list[dict[str, str]]]:
    """The SR (PS3.3 A.35.13, every analysed image in its evidence) and one SC (PS3.3 A.8.1) per image, as
    the daemon builds them, except that an object whose builder raises is left out and reported as
    ``{kind, image_sop_uid, image_series_uid, error}`` (the image UIDs empty for the study's SR); the rest
    are still returned: a result object that cannot be built never blocks the others."""
    futures = submit_scs(analysis, sc_max_size, pool)  # rendered on the pool while the SR is built here
    objects: list[tuple[str, Dataset]] = []
    problems: list[dict[str, str]] = []
    try:
        sr = build_sr(analysis.result, analysis.sources, manifest.title)
        complete_evidence(sr, analysis.sources)
        objects.append(("SR", sr))
    except Exception as exc:
        problems.append({"kind": "SR", "image_sop_uid": "", "image_series_uid": "", "error": _fault(exc)})
    for img, fut in zip(analysis.result.images, futures, strict=True):
        try:
            objects.append(("SC", fut.result()))
        except Exception as exc:
            problems.append(
                {
                    "kind": "SC",
                    "image_sop_uid": img.sop_instance_uid,
                    "image_series_uid": img.series_instance_uid,
                    "error": _fault(exc),
                }
            )
    for e in problems:
        log.warning("result object not built", kind=e["kind"], image_sop_uid=e["image_sop_uid"], error=e["error"])
    return objects, problems


def format_table(report: dict[str, Any]) -> str:
    """A findings table a person can read at a glance."""
    lines = [f"{'study':<18} {'bundle':<22} {'image':<14} {'side':<4} {'finding':<14} {'score':>6}  {'':<8} location"]
    for st in report["studies"]:
        short = "…" + st["study_uid"][-16:]
        if not st["results"]:
            lines.append(f"{short:<18} {st['state']}: {st['reason']}")
        for obj in st.get("objects", []):  # a not_analysed study's "AI not applied" notices
            lines.append(f"{'':<18} {obj['kind']}: {obj['path']}")
        shared = {c["sop_instance_uid"] for c in st.get("sop_uid_conflicts", [])}
        for res in st["results"]:
            tag = f"{res['bundle_id']} {res['bundle_version']}"
            for f in res["findings"]:
                loc = f["location"]
                where = f"row {loc['row']:.0f}, col {loc['col']:.0f}" if loc else ""
                image = "…" + f["image_sop_uid"][-12:]
                if f["image_sop_uid"] in shared:  # the SOP UID alone does not say which image: add the series
                    image = f"…{f.get('image_series_uid', '')[-5:]}/…{f['image_sop_uid'][-5:]}"
                lines.append(
                    f"{short:<18} {tag:<22} {image:<14} {f['laterality'] or '':<4} "
                    f"{f['label']:<14} {f['score']:>6.3f}  {'POSITIVE' if f['positive'] else '':<8} {where}"
                )
            extra = f"study score {res['study_score']:.3f}"
            if res.get("per_breast"):
                extra += "  " + "  ".join(f"{k} breast {v:.3f}" for k, v in sorted(res["per_breast"].items()))
            lines.append(f"{short:<18} {tag:<22} {extra}")
            for obj in res.get("objects", []):
                lines.append(f"{'':<18} {obj['kind']}: {obj['path']}")
            for na in res.get("not_applied", []):
                lines.append(f"{'':<18} AI not applied to image …{na['image_sop_uid'][-12:]}: {na['reason']}")
            for sk in res.get("skipped", []):
                lines.append(f"{'':<18} not analysed {sk['path'] or sk['image_sop_uid']}: {sk['reason']}")
            if not res["clinical_use"]:
                lines.append(f"{'':<18} NOT FOR CLINICAL USE ({res['bundle_id']} is a reference model)")
    for st in report["studies"]:
        short = "…" + st["study_uid"][-16:]
        for c in st.get("sop_uid_conflicts", []):
            lines.append(
                f"{short:<18} note: {len(c['series_uids'])} images in different series share SOP Instance UID"
                f" …{c['sop_instance_uid'][-12:]}; each analysed"
            )
        for r in st.get("replaced", []):
            lines.append(f"{short:<18} note: {r['path']} not analysed, {r['by']} is the same image ({r['reason']})")
    for e in report["errors"]:
        lines.append(f"skipped {e['path']}: {e['error']}")
    return "\n".join(lines)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def image_identity(ds: Dataset) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID): what identifies one image of a study (PS3.3 C.7.3.1, C.12.1),
    as the daemon's ``records.study_instances`` decides; a missing series UID counts as empty."""
    return str(ds.get("SeriesInstanceUID", "") or ""), str(ds.SOPInstanceUID)


def one_copy_per_image(files: list[tuple[Path, Dataset]]) -> Study:
    """The images of one study, one copy each (:func:`image_identity`), in file order: of several files of one
    image the newest (modification time, then the later path) is kept, as a corrected resend replaces its
    earlier copy in the daemon; the others are named in ``replaced``, never dropped silently."""
    newest: dict[tuple[str, str], int] = {}
    for i, (path, ds) in enumerate(files):
        key = image_identity(ds)
        j = newest.get(key)
        if j is None or (path.stat().st_mtime_ns, i) >= (files[j][0].stat().st_mtime_ns, j):
            newest[key] = i
    kept = sorted(newest.values())
    replaced = []
    for i, (path, ds) in enumerate(files):
        j = newest[image_identity(ds)]
        if i != j:
            same = _sha256(path) == _sha256(files[j][0])
            replaced.append(
                {
                    "path": str(path),
                    "by": str(files[j][0]),
                    "reason": "same series and SOP Instance UID, "
                    + ("identical file" if same else "older file (the newest copy of an image is analysed)"),
                }
            )
    images = [files[i][1] for i in kept]
    return Study(images, replaced, uids.shared_sop_uids(image_identity(ds) for ds in images))
