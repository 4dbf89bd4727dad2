"""``appliance infer PATH...``: the daemon's pipeline on files and folders, without network or database.

Files are grouped into studies by StudyInstanceUID, routed to the active bundles exactly as the worker
does, analysed, and (with ``--out``) the SR and SC objects are written to ``OUT/<study uid>/``.
"""

from __future__ import annotations

from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from appliance.core.config import Settings
from appliance.models.active import ActiveEngines
from appliance.pipeline.analyse import analyse_route
from appliance.pipeline.preprocess import NotProcessable
from appliance.pipeline.results import build_objects, write_objects
from appliance.pipeline.router import InferenceEngine, explain, route
from appliance.pipeline.worker import BundleSource
from engines.manifest import Manifest

POOL_THREADS = 4  # image preparation and result building overlap (decoders, numpy, Pillow release the GIL)


def collect(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or folder")
        files.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
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
    studies: dict[str, list[Dataset]] = {}
    for f in files:
        try:
            ds = dcmread(f)
        except (InvalidDicomError, OSError, ValueError) as exc:
            errors.append({"path": str(f), "error": f"not readable as DICOM: {exc}"})
            continue
        if "StudyInstanceUID" not in ds or "SOPInstanceUID" not in ds:
            errors.append({"path": str(f), "error": "no StudyInstanceUID/SOPInstanceUID"})
            continue
        studies.setdefault(str(ds.StudyInstanceUID), []).append(ds)
    source = bundles or default_bundles(settings)
    try:
        active = [(m, e) for m, e in source.active() if bundle is None or m.bundle_id == bundle]
        with ThreadPoolExecutor(max_workers=POOL_THREADS, thread_name_prefix="infer-offline") as pool:
            return _run_studies(settings, studies, active, out, errors, pool)
    finally:
        if bundles is None:
            source.close()


def _run_studies(
    settings: Settings,
    studies: dict[str, list[Dataset]],
    active: list[tuple[Manifest, InferenceEngine]],
    out: Path | None,
    errors: list[dict[str, str]],
    pool: Executor,
) -> dict[str, Any]:
    p = settings.pipeline
    report: dict[str, Any] = {"studies": [], "errors": errors}
    for study_uid, images in studies.items():
        entry: dict[str, Any] = {"study_uid": study_uid, "results": [], "state": "inferred", "reason": None}
        routes = route(active, images, p.routes)
        if not routes:
            entry.update(state="no_model", reason=explain(active, images, p.routes))
        reasons = []
        for r in routes:
            try:
                a = analyse_route(r, p, None, pool)
            except NotProcessable as exc:
                reasons.append(f"{r.manifest.bundle_id}: {exc.reason}")
                continue
            summary = a.result.summary()
            summary["skipped"] = [{"image_sop_uid": s, "reason": why} for s, why in a.skipped]
            summary["timings_s"] = {k: round(v, 4) for k, v in a.timings.items()}
            if out is not None:
                objects = build_objects(a, r.manifest, p.sc_max_size, pool)
                target = out / study_uid / f"{r.manifest.bundle_id}-{r.manifest.version}"
                summary["objects"] = [
                    {"kind": k, "sop_uid": str(ds.SOPInstanceUID), "path": str(path)}
                    for k, ds, path in write_objects(objects, target, pool)
                ]
            entry["results"].append(summary)
        if routes and not entry["results"]:
            entry.update(state="not_processable", reason="; ".join(reasons))
        elif reasons:
            entry["reason"] = "; ".join(reasons)
        report["studies"].append(entry)
    return report


def format_table(report: dict[str, Any]) -> str:
    """A findings table a person can read at a glance."""
    lines = [f"{'study':<18} {'bundle':<22} {'image':<14} {'side':<4} {'finding':<14} {'score':>6}  {'':<8} location"]
    for st in report["studies"]:
        short = "…" + st["study_uid"][-16:]
        if not st["results"]:
            lines.append(f"{short:<18} {st['state']}: {st['reason']}")
        for res in st["results"]:
            tag = f"{res['bundle_id']} {res['bundle_version']}"
            for f in res["findings"]:
                loc = f["location"]
                where = f"row {loc['row']:.0f}, col {loc['col']:.0f}" if loc else ""
                lines.append(
                    f"{short:<18} {tag:<22} {'…' + f['image_sop_uid'][-12:]:<14} {f['laterality'] or '':<4} "
                    f"{f['label']:<14} {f['score']:>6.3f}  {'POSITIVE' if f['positive'] else '':<8} {where}"
                )
            extra = f"study score {res['study_score']:.3f}"
            if res.get("per_breast"):
                extra += "  " + "  ".join(f"{k} breast {v:.3f}" for k, v in sorted(res["per_breast"].items()))
            lines.append(f"{short:<18} {tag:<22} {extra}")
            for obj in res.get("objects", []):
                lines.append(f"{'':<18} {obj['kind']}: {obj['path']}")
            if not res["clinical_use"]:
                lines.append(f"{'':<18} NOT FOR CLINICAL USE ({res['bundle_id']} is a reference model)")
    for e in report["errors"]:
        lines.append(f"skipped {e['path']}: {e['error']}")
    return "\n".join(lines)
