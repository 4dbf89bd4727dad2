"""preprocess -> engine -> postprocess for the images of one study and one bundle.

Shared by the daemon's worker and ``appliance infer``: the engine is any callable taking and returning
``dict[str, np.ndarray]`` (the engines package's ``Engine.infer``), so this module does not care whether it
is ONNX Runtime or TensorRT. All images of a study go through in as few batches as ``max_batch`` allows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

from appliance.core.config import PipelineConfig
from appliance.core.executors import submit_or_run
from appliance.core.logs import get_logger
from appliance.pipeline.postprocess import (
    ImageResult,
    SiteOperatingPoint,
    StudyResult,
    grid_directions,
    image_findings,
    laterality,
    site_thresholds,
    study_result,
    view_of,
)
from appliance.pipeline.preprocess import NotProcessable, Prepared, prepare
from appliance.pipeline.router import Route, refused_summary
from engines.manifest import Manifest, Preprocessing

log = get_logger(__name__)

InferFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
CachedFn = Callable[[Dataset], "Prepared | None"]  # an image already prepared for the bundle, or None
PATIENT_FIELDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyDate")


@dataclass
class Analysis:
    result: StudyResult
    prepared: list[Prepared]  # same order as result.images
    sources: list[Dataset]  # same order as result.images
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (sop uid, reason)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: preprocess, inference, postprocess


def patient_fields(ds: Dataset) -> dict[str, str]:
    return {name: str(ds.get(name, "") or "") for name in PATIENT_FIELDS}


def _prepared(ds: Dataset, spec: Preprocessing, max_pixels: int, min_size: int, cached: CachedFn | None) -> Prepared:
    hit = cached(ds) if cached is not None else None
    return hit if hit is not None else prepare(ds, spec, max_pixels, min_size)


def analyse(
    datasets: list[Dataset],
    manifest: Manifest,
    infer: InferFn,
    max_batch: int,
    max_pixels: int,
    min_size: int = 16,
    cached: CachedFn | None = None,
    pool: Executor | None = None,
    site: SiteOperatingPoint | None = None,
) -> Analysis:
    """Run one bundle on one study's images. Raises NotProcessable if no image can be used.

    ``site``: the site operating point in force for the bundle (its thresholds judge the labels it names while
    they lie within the manifest's ``threshold_range``; the result records its version), None for the
    manifest's thresholds.

    Images are prepared on ``pool`` concurrently (decoders such as openjpeg and gdcm, and numpy, release the
    GIL), or one after the other on this thread without one.

    ``cached(ds)`` may return the image already prepared for this bundle (``prepare_early``); the others are
    prepared here. ``prepare`` is deterministic, so the result is the same either way.
    """
    if not datasets:
        raise NotProcessable("no images in the study")
    spec = manifest.input
    t0 = time.perf_counter()
    usable: list[tuple[Dataset, Prepared]] = []
    skipped: list[tuple[str, str]] = []
    futures = [submit_or_run(pool, _prepared, ds, spec.preprocessing, max_pixels, min_size, cached) for ds in datasets]
    for ds, fut in zip(datasets, futures, strict=True):
        try:
            usable.append((ds, fut.result()))
        except NotProcessable as exc:
            sop = str(ds.get("SOPInstanceUID", "?"))
            log.warning("image not processable", sop_uid=sop, reason=exc.reason, bundle=manifest.bundle_id)
            skipped.append((sop, exc.reason))
    if not usable:
        raise NotProcessable("; ".join(f"{sop}: {reason}" for sop, reason in skipped), skipped)
    t1 = time.perf_counter()

    dtype = np.float16 if spec.dtype == "float16" else np.float32
    batch = max(1, int(max_batch))
    outputs: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(usable), batch):
        x = np.stack([p.tensor for _, p in usable[start : start + batch]]).astype(dtype, copy=False)
        out = infer({spec.name: x})
        for name, arr in out.items():
            outputs.setdefault(name, []).append(np.asarray(arr, dtype=np.float32))
    merged = {name: np.concatenate(parts, axis=0) for name, parts in outputs.items()}
    t2 = time.perf_counter()

    score_spec = manifest.output("scores")
    heat_spec = manifest.output("heatmap")
    if score_spec is None or score_spec.name not in merged:
        raise RuntimeError(f"bundle {manifest.bundle_id} produced no scores output")
    images: list[ImageResult] = []
    site_thr = site_thresholds(manifest, site)
    for i, (ds, prep) in enumerate(usable):
        heat = merged[heat_spec.name][i] if heat_spec is not None and heat_spec.name in merged else None
        findings, maps = image_findings(
            merged[score_spec.name][i],
            score_spec,
            heat,
            heat_spec,
            prep.transform,
            manifest.urgent,
            site_thr,
            grid_directions(ds, spec.preprocessing),
        )
        images.append(
            ImageResult(
                sop_instance_uid=str(ds.SOPInstanceUID),
                series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
                sop_class_uid=str(ds.SOPClassUID),
                laterality=laterality(ds),
                view=view_of(ds),
                findings=findings,
                score=max((f.score for f in findings), default=0.0),
                heatmaps=maps,
                heatmap_stride=int(heat_spec.stride or 1) if heat_spec else 1,
                transform=prep.transform,
                modality=str(ds.get("Modality", "") or "") or None,
            )
        )
    first = usable[0][0]
    op_version = site.version if site is not None and site_thr else None
    result = study_result(manifest, str(first.StudyInstanceUID), images, patient_fields(first), op_version)
    t3 = time.perf_counter()
    return Analysis(
        result=result,
        prepared=[p for _, p in usable],
        sources=[ds for ds, _ in usable],
        skipped=skipped,
        timings={"preprocess": t1 - t0, "inference": t2 - t1, "postprocess": t3 - t2},
    )


def analyse_route(
    r: Route,
    cfg: PipelineConfig,
    cached: CachedFn | None = None,
    pool: Executor | None = None,
    site: SiteOperatingPoint | None = None,
) -> Analysis:
    """:func:`analyse` one routed (bundle, images) pair with the pipeline's configured limits and the site
    operating point ``site`` in force for its bundle; the images the bundle's gate refused (``r.refused``) are
    named in ``result.not_applied``, never analysed."""
    max_batch = r.engine.max_batch or 1
    analysis = analyse(
        r.images, r.manifest, r.engine.infer, max_batch, cfg.max_pixels, cfg.min_image_size, cached, pool, site
    )
    analysis.result.not_applied = refused_summary(r.refused)
    return analysis
