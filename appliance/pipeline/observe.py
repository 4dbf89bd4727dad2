"""What the pipeline tells the bundle statistics (``appliance.models.stats``) about one study: the analysed
images' scores, inputs and equipment, and the images a bundle did not take, by refusal category.

Read from the analysis and the images' headers only: Manufacturer (0008,0070) and Manufacturer's Model Name
(0008,1090) (equipment, not a person; Station Name, Device Serial Number and Institution Name are never read),
Photometric Interpretation (0028,0004), Bits Stored (0028,0101), Rows / Columns (0028,0010/0011) as a size band,
and the file's Transfer Syntax UID (0002,0010). The input statistics are those of the preprocessed image in
[0, 1] before the manifest's mean/std, over the image content only (the padding of an aspect-preserving fit is
left out): its mean and 95th percentile (:func:`input_summary`; a reference is built with the same function).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

import numpy as np
from pydicom.dataset import Dataset

from appliance.models import stats
from appliance.pipeline.analyse import Analysis
from appliance.pipeline.preprocess import Prepared
from appliance.pipeline.router import Route
from engines.manifest import Manifest, Preprocessing

# The first words of preprocessing's refusal reasons (preprocess.check_header / decode / reorientation) -> the
# statistics' refusal category (the router's gate gives its own: ``router.Refusal.category``). Matched in order,
# on the reason's start (lower case).
_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("patient orientation", "orientation"),
    ("absurd image dimensions", "size"),
    ("image too large", "size"),
    ("image too small", "size"),
    ("colour image", "photometric"),
    ("unsupported bitsallocated", "bits"),
    ("multi-frame", "multi_frame"),
    ("no pixel data", "pixel_data"),
    ("float pixel data", "pixel_data"),
    ("pixel data could not be decoded", "pixel_data"),
    ("decoded pixel array", "pixel_data"),
    ("image header incomplete", "unreadable"),
    ("unreadable", "unreadable"),
)


def refusal_category(reason: str) -> str:
    """The statistics category of a refusal reason of this pipeline (``preprocess.NotProcessable``,
    ``router.refusal``): e.g. "image too small: 8x8 ..." -> ``size``, "modality CT not in DX" -> ``modality``;
    anything else ``other``."""
    text = reason.strip().lower()
    return next((cat for prefix, cat in _CATEGORIES if text.startswith(prefix)), stats.OTHER)


def input_summary(prepared: Prepared, spec: Preprocessing) -> tuple[float, float]:
    """(mean, 95th percentile) of the preprocessed image in [0, 1] before mean/std (``x * std + mean`` of the
    tensor), over the content region of the tensor (``Transform.offset`` / ``content_shape``), clipped to [0, 1]."""
    tf = prepared.transform
    r0, c0 = int(tf.offset[0]), int(tf.offset[1])
    h, w = tf.content_shape
    x = prepared.tensor[0, r0 : r0 + h, c0 : c0 + w].astype(np.float64) * spec.std + spec.mean
    x = np.clip(x, 0.0, 1.0)
    return float(x.mean()), float(np.percentile(x, 95))


def _transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    uid = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
    return uid if uid and all(part.isdigit() for part in uid.split(".")) else "unknown"


def _int(ds: Dataset, name: str) -> int | None:
    try:
        return int(ds.get(name))
    except (TypeError, ValueError):
        return None


def image_inputs(ds: Dataset) -> dict[str, str]:
    """The inputs maps' values of one image (``stats.INPUT_MAPS``), from its header."""
    rows, cols = _int(ds, "Rows") or 0, _int(ds, "Columns") or 0
    bits = _int(ds, "BitsStored")
    maker, model = stats.clean_text(ds.get("Manufacturer")), stats.clean_text(ds.get("ManufacturerModelName"))
    return {
        "manufacturer_model": f"{maker}|{model}",
        "photometric": stats.clean_text(ds.get("PhotometricInterpretation"), 16),
        "bits_stored": str(bits) if bits is not None and 0 < bits <= 64 else "unknown",
        "size_band": stats.size_band(rows, cols),
        "transfer_syntax": _transfer_syntax(ds),
    }


def observation(analysis: Analysis, manifest: Manifest) -> stats.StudyObservation:
    """The statistics of one analysed study (``stats.record_study``): per-image scores and positives per label,
    the study score, each analysed image's input summary and header values, and the skipped images by category."""
    res = analysis.result
    obs = stats.StudyObservation(manifest.bundle_id, manifest.version, float(res.study_score))
    for img in res.images:
        for f in img.findings:
            obs.image_scores.setdefault(f.label, []).append(float(f.score))
            obs.positives[f.label] = obs.positives.get(f.label, 0) + int(bool(f.positive))
    spec = manifest.input.preprocessing
    for prep, ds in zip(analysis.prepared, analysis.sources, strict=True):
        mean, p95 = input_summary(prep, spec)
        obs.input_means.append(mean)
        obs.input_p95s.append(p95)
        for name, value in image_inputs(ds).items():
            obs.inputs.setdefault(name, []).append(value)
    for _, reason in analysis.skipped:
        cat = refusal_category(reason)
        obs.refusals[cat] = obs.refusals.get(cat, 0) + 1
    return obs


def record_unanalysed(conn: sqlite3.Connection, manifest: Manifest, reasons: Iterable[str]) -> None:
    """A bundle applied to a study but took none of its images (``not_processable``): one refusal per image
    reason and one ``not_analysed`` study, in the caller's transaction."""
    for reason in reasons:
        stats.record_refusal(conn, manifest.bundle_id, manifest.version, refusal_category(reason))
    stats.record_not_analysed(conn, manifest.bundle_id, manifest.version)


def record_no_model(conn: sqlite3.Connection, refusals: Iterable[tuple[Manifest, str]]) -> None:
    """No active bundle took any image of a study (``no_model``): each refusal (bundle, ``router.Refusal``
    category) counted, in the caller's transaction. A study is not counted ``not_analysed`` here: it never was a
    bundle's."""
    for manifest, category in refusals:
        stats.record_refusal(conn, manifest.bundle_id, manifest.version, category)


def record_gated(conn: sqlite3.Connection, routes: Iterable[Route], *, whole: bool) -> None:
    """The images each route's input gate refused (``Route.refused``), counted by their ``router.Refusal``
    category, in the caller's transaction; with ``whole`` (every image of the study refused: ``not_analysed``)
    each bundle also counts the study as not analysed."""
    for r in routes:
        for _, why in r.refused:
            stats.record_refusal(conn, r.manifest.bundle_id, r.manifest.version, why.category)
        if whole:
            stats.record_not_analysed(conn, r.manifest.bundle_id, r.manifest.version)
