"""Model outputs -> findings: activations, per-label thresholds, heatmap peaks and contours in original
pixel coordinates, per-breast and study-level scores.

Everything here is pure numpy on already-computed outputs, so it is cheap and unit-testable. Locations are
reported as original pixel *indices* (row, col) (pixel centre = integer); the SR builder converts to DICOM
SCOORD (column + 0.5, row + 0.5), where (0, 0) is the top-left corner of the top-left pixel.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from appliance.core.logs import get_logger
from appliance.pipeline.anatomy import laterality_of
from appliance.pipeline.anatomy import view_of as coded_view
from appliance.pipeline.preprocess import Transform, patient_orientation
from engines.manifest import Manifest, OutputSpec, Preprocessing, check_site_thresholds

log = get_logger(__name__)

THRESHOLD_MANIFEST = "manifest"  # a finding judged by the bundle manifest's threshold
THRESHOLD_SITE = "site"  # ... by the site operating point in force (signed by the central team)
CONTOUR_FRACTION = 0.5  # iso-line at half of the peak above the map's floor
CONTOUR_RAYS = 32
# Several places per label (non-maximum suppression, :func:`peaks`): a secondary peak is kept when it is a local
# maximum of the heatmap, reaches PEAK_RELATIVE_HEIGHT of the label's highest peak (both above the map's floor)
# and lies at least PEAK_MIN_SEPARATION (a fraction of the heatmap's larger side, in heatmap cells; at least
# 2 cells) from every stronger kept peak. At most MAX_PLACES places per label.
PEAK_RELATIVE_HEIGHT = 0.7
PEAK_MIN_SEPARATION = 0.12
MAX_PLACES = 4


@dataclass
class Location:
    """Where a finding is, in original pixel indices of its source image."""

    row: float
    col: float
    contour: list[tuple[float, float]]  # closed polygon (row, col), first point not repeated
    peak: float  # heatmap value at the peak (after activation)
    side: str | None = None  # the patient's side it lies on, "L" or "R" (:func:`patient_side`); None: unknown


@dataclass(frozen=True)
class SiteOperatingPoint:
    """A site's thresholds for one bundle (label -> score threshold, the same units as the scores after
    activation), from the operating-point document ``version`` in force (the composition root reads it from the
    cloud overlay; the pipeline only sees this). Applied per label only while it lies within the manifest's
    ``threshold_range`` for that label; otherwise the manifest's threshold judges it."""

    thresholds: Mapping[str, float]
    version: int
    site: str | None = None


class OperatingPoints(Protocol):
    """Port: the site operating point in force for a bundle (None: the manifest's thresholds)."""

    def __call__(self, manifest: Manifest) -> SiteOperatingPoint | None: ...


def no_operating_points(manifest: Manifest) -> SiteOperatingPoint | None:
    """:class:`OperatingPoints` of a box without site operating points (no cloud): always the manifest's."""
    return None


@dataclass
class Finding:
    """One label's result on one image. ``threshold`` judged it (``positive`` = score >= threshold), taken from
    ``threshold_source``: ``"manifest"`` or ``"site"`` (the site operating point in force). ``urgent``: positive
    and at or above the bundle's urgent threshold for the label (``Manifest.urgent``; ``urgent_threshold`` None
    when the label has none). ``locations``: every place the finding occurs (strongest first, :func:`peaks`);
    ``location`` is the strongest of them (the first), kept for readers of one place."""

    label: str
    score: float
    threshold: float
    positive: bool
    location: Location | None = None
    urgent: bool = False
    urgent_threshold: float | None = None
    threshold_source: str = THRESHOLD_MANIFEST
    locations: list[Location] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.locations and self.location is not None:
            self.locations = [self.location]
        if self.location is None and self.locations:
            self.location = self.locations[0]


@dataclass
class ImageResult:
    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    laterality: str | None  # "L", "R" or None
    view: str | None
    findings: list[Finding]
    score: float  # this image's abnormality score = max over its labels
    heatmaps: dict[str, np.ndarray] = field(default_factory=dict)  # label -> (h, w) activated
    heatmap_stride: int = 1
    transform: Transform | None = None
    modality: str | None = None


@dataclass
class StudyResult:
    study_instance_uid: str
    bundle_id: str
    bundle_version: str
    task: str
    clinical_use: bool
    images: list[ImageResult]
    per_breast: dict[str, float] | None
    study_score: float
    patient: dict[str, str] = field(default_factory=dict)
    # images of the bundle's modality that its input gate refused (never analysed, never scored):
    # [{image_sop_uid, image_series_uid, category, reason}] (``router.refused_summary``)
    not_applied: list[dict[str, str]] = field(default_factory=list)
    operating_point_version: int | None = None  # the site operating point that judged it (None: the manifest)

    @property
    def urgent_labels(self) -> list[str]:
        """The labels with an urgent finding on any image (sorted): non-empty = the study is urgent."""
        return sorted({f.label for img in self.images for f in img.findings if f.urgent})

    def reading(self) -> list[dict[str, Any]]:
        """The findings as a radiologist reads them: :func:`reading` over this result's images."""
        return reading(
            [
                {"laterality": img.laterality, "view": img.view, "side": finding_side(img.laterality, f), **_brief(f)}
                for img in self.images
                for f in img.findings
            ]
        )

    def summary(self) -> dict[str, Any]:
        """The findings JSON stored with the study (and, de-identified elsewhere, sent to the central team).

        Per finding (one per image and label): its score, threshold and verdict, ``location`` (the strongest
        place) and ``locations`` (every place: ``{row, col, contour, side}`` in original pixel indices of the
        stored grid, ``side`` the patient's side "L"/"R" or None), and ``side`` (:func:`finding_side`).
        ``reading``: the study's findings per label and side (:func:`reading`)."""
        return {
            "study_uid": self.study_instance_uid,
            "patient": self.patient,
            "bundle_id": self.bundle_id,
            "bundle_version": self.bundle_version,
            "task": self.task,
            "clinical_use": self.clinical_use,
            "modality": next((img.modality for img in self.images if img.modality), None),
            "study_score": round(self.study_score, 6),
            "per_breast": {k: round(v, 6) for k, v in self.per_breast.items()} if self.per_breast else None,
            "findings": [
                {
                    "image_sop_uid": img.sop_instance_uid,
                    "image_series_uid": img.series_instance_uid,  # tells apart images re-using a SOP UID
                    "laterality": img.laterality,
                    "view": img.view,
                    "label": f.label,
                    "score": round(f.score, 6),
                    "threshold": f.threshold,
                    "threshold_source": f.threshold_source,
                    "positive": f.positive,
                    "urgent": f.urgent,
                    "urgent_threshold": f.urgent_threshold,
                    "location": None if f.location is None else _location_json(f.location),
                    "locations": [_location_json(loc) for loc in f.locations],
                    "side": finding_side(img.laterality, f),
                }
                for img in self.images
                for f in img.findings
            ],
            "reading": self.reading(),
            "urgent": self.urgent_labels,
            "operating_point_version": self.operating_point_version,
            "images": [
                {
                    "sop_instance_uid": img.sop_instance_uid,
                    "series_uid": img.series_instance_uid,
                    "rows": img.transform.original_shape[0] if img.transform else None,
                    "columns": img.transform.original_shape[1] if img.transform else None,
                    "view": img.view,
                    "laterality": img.laterality,
                }
                for img in self.images
            ],
            "not_applied": [dict(item) for item in self.not_applied],
        }


def _location_json(loc: Location) -> dict[str, Any]:
    return {
        "row": round(loc.row, 2),
        "col": round(loc.col, 2),
        "contour": [[round(r, 2), round(c, 2)] for r, c in loc.contour],
        "side": loc.side,
    }


def _brief(f: Finding) -> dict[str, Any]:
    return {
        "label": f.label,
        "score": f.score,
        "positive": f.positive,
        "urgent": f.urgent,
        "places": len(f.locations),
        "sides": [loc.side for loc in f.locations],
    }


def finding_side(image_laterality: str | None, f: Finding) -> str | None:
    """The side a finding is read on: the image's laterality when it has one (mammography: the breast, PS3.3
    C.8.11.7 Image Laterality), else the one patient side all its places lie on ("L"/"R"); None when its places
    lie on both sides, have no side, or it has no place (a negative finding on a chest: read for the whole
    image). A finding on both sides is split by :func:`reading` into one entry per side."""
    if image_laterality in ("L", "R"):
        return image_laterality
    sides = {loc.side for loc in f.locations}
    return sides.pop() if len(sides) == 1 else None


def reading(entries: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Findings grouped the way a radiologist reads them: one entry per (label, side).

    ``entries``: one per image and label: ``{label, score, positive, urgent, laterality, view, side, places}``
    and optionally ``sides`` (the patient side of each place, as ``locations[i]["side"]`` in the summary).
    A finding whose places lie on both sides (a bilateral effusion) counts for each side. Returns, per (label,
    side), sorted urgent first, then positive, then by score (descending), label and side:
    ``{label, side ("L"/"R"/None), score (max over the group, 0..1), positive, urgent, views (sorted: the views
    of the images whose finding is positive, else of the highest-scoring one; e.g. ["CC", "MLO"]: the views that
    support the breast's score), places (how many places were marked on that side, summed over images)}``.
    """
    groups: dict[tuple[str, str | None], dict[str, Any]] = {}
    for e in entries:
        place_sides = list(e.get("sides") or [])
        if e.get("laterality") in ("L", "R") or not place_sides:
            split = {e.get("side"): int(e.get("places") or 0)}
        else:
            split = {}
            for side in place_sides:
                split[side] = split.get(side, 0) + 1
            if len(split) > 1:  # sides known for some places only: those without one are read with the others
                split.pop(None, None)
        for side, places in split.items():
            key = (str(e["label"]), side)
            g = groups.setdefault(
                key,
                {
                    "label": key[0],
                    "side": side,
                    "score": 0.0,
                    "positive": False,
                    "urgent": False,
                    "places": 0,
                    "_pos": set(),
                    "_best": (-1.0, None),
                },
            )
            score = float(e.get("score") or 0.0)
            g["positive"] = g["positive"] or bool(e.get("positive"))
            g["urgent"] = g["urgent"] or bool(e.get("urgent"))
            g["places"] += places
            if e.get("positive") and e.get("view"):
                g["_pos"].add(str(e["view"]))
            if score > g["_best"][0]:
                g["_best"] = (score, e.get("view"))
            g["score"] = max(g["score"], round(score, 6))
    out = []
    for g in groups.values():
        pos, best = g.pop("_pos"), g.pop("_best")
        g["views"] = sorted(pos) if pos else ([str(best[1])] if best[1] else [])
        out.append(g)
    return sorted(out, key=lambda g: (not g["urgent"], not g["positive"], -g["score"], g["label"], g["side"] or ""))


def activate(x: np.ndarray, activation: str, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    if activation == "softmax":
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)
    return x


def _bilinear(hm: np.ndarray, r: np.ndarray, c: np.ndarray) -> np.ndarray:
    h, w = hm.shape
    r = np.clip(r, 0, h - 1)
    c = np.clip(c, 0, w - 1)
    r0 = np.minimum(np.floor(r).astype(np.int64), h - 2 if h > 1 else 0)
    c0 = np.minimum(np.floor(c).astype(np.int64), w - 2 if w > 1 else 0)
    r1, c1 = np.minimum(r0 + 1, h - 1), np.minimum(c0 + 1, w - 1)
    fr, fc = r - r0, c - c0
    top = hm[r0, c0] * (1 - fc) + hm[r0, c1] * fc
    bot = hm[r1, c0] * (1 - fc) + hm[r1, c1] * fc
    return top * (1 - fr) + bot * fr


def _refine(hm: np.ndarray, r: int, c: int) -> tuple[float, float, float]:
    """(row, col, value) of the cell (r, c), refined to sub-cell precision by a weighted centroid (3x3)."""
    r0, r1 = max(r - 1, 0), min(r + 2, hm.shape[0])
    c0, c1 = max(c - 1, 0), min(c + 2, hm.shape[1])
    win = hm[r0:r1, c0:c1].astype(np.float64)
    w = win - win.min()
    total = w.sum()
    if total <= 0:
        return float(r), float(c), float(hm[r, c])
    rr, cc = np.mgrid[r0:r1, c0:c1]
    return float((w * rr).sum() / total), float((w * cc).sum() / total), float(hm[r, c])


def peak(hm: np.ndarray) -> tuple[float, float, float]:
    """(row, col, value) of the maximum, refined to sub-cell precision by a weighted centroid (3x3)."""
    r, c = np.unravel_index(int(np.argmax(hm)), hm.shape)
    return _refine(hm, int(r), int(c))


def peaks(
    hm: np.ndarray,
    relative_height: float = PEAK_RELATIVE_HEIGHT,
    min_separation: float = PEAK_MIN_SEPARATION,
    max_peaks: int = MAX_PLACES,
) -> list[tuple[float, float, float]]:
    """Every place a heatmap marks: non-maximum suppression over ``hm`` (h, w), float, activated.

    A cell is a candidate when it is a local maximum of its 3x3 neighbourhood and its height above the map's
    floor (minimum) is at least ``relative_height`` times the highest peak's. Candidates are taken strongest
    first; one within ``min_separation`` * max(h, w) heatmap cells (Euclidean, at least 2 cells) of a kept peak
    is suppressed, and so is one not separate from every kept peak: the map must dip, on the straight line to
    it, below this candidate's contour level (:data:`CONTOUR_FRACTION` of its height above the floor), so that
    each place has its own outline (one bright region with a few bumps stays one place). Returns at most
    ``max_peaks`` (row, col, value) in heatmap cells, strongest first, each refined
    like :func:`peak`; the first is :func:`peak`'s. A flat map gives its one :func:`peak`.
    """
    hm = np.asarray(hm, dtype=np.float64)
    floor, top = float(hm.min()), float(hm.max())
    if top <= floor:
        return [peak(hm)]
    padded = np.pad(hm, 1, constant_values=-np.inf)
    neighbourhood = np.lib.stride_tricks.sliding_window_view(padded, (3, 3)).max(axis=(2, 3))
    candidate = (hm >= neighbourhood) & (hm - floor >= relative_height * (top - floor))
    rows, cols = np.nonzero(candidate)
    order = np.argsort(-hm[rows, cols], kind="stable")
    rows, cols = rows[order], cols[order]
    sep = max(2.0, min_separation * max(hm.shape))
    dist = np.hypot(rows[:, None] - rows[None, :], cols[:, None] - cols[None, :])
    alive = np.ones(len(rows), dtype=bool)
    kept: list[int] = []
    for i in range(len(rows)):
        if not alive[i]:
            continue
        if kept and not _separate(hm, (rows[i], cols[i]), [(rows[k], cols[k]) for k in kept], floor):
            continue
        kept.append(i)
        if len(kept) == max_peaks:
            break
        alive &= dist[i] >= sep
    return [_refine(hm, int(rows[i]), int(cols[i])) for i in kept]


def contour(
    hm: np.ndarray,
    pr: float,
    pc: float,
    fraction: float = CONTOUR_FRACTION,
    rays: int = CONTOUR_RAYS,
    top: float | None = None,
):
    """Star-shaped iso-line around the peak: along each ray, where the map falls below the level.

    Level = floor + fraction * (top - floor), floor = the map's minimum, ``top`` the height of this peak (None:
    the map's maximum, the strongest peak). Linear interpolation between the last sample above and the first
    below gives sub-cell vertices. Returns (rays, 2) cell coordinates.
    """
    floor = float(hm.min())
    here = float(_bilinear(hm, np.array([pr]), np.array([pc]))[0])
    level = floor + fraction * (max(here, float(hm.max()) if top is None else float(top)) - floor)
    step = 0.25
    n = int(np.ceil(max(hm.shape) / step)) + 1
    theta = np.linspace(0.0, 2 * np.pi, rays, endpoint=False)
    t = np.arange(n) * step
    rr = pr + np.sin(theta)[:, None] * t[None, :]
    cc = pc + np.cos(theta)[:, None] * t[None, :]
    inside = (rr >= 0) & (rr <= hm.shape[0] - 1) & (cc >= 0) & (cc <= hm.shape[1] - 1)
    vals = np.where(inside, _bilinear(hm, rr, cc), -np.inf)
    below = vals < level
    below[:, -1] = True
    first = np.argmax(below, axis=1)  # first sample below the level (>= 1 since the peak is above)
    first = np.maximum(first, 1)
    idx = np.arange(rays)
    v_in, v_out = vals[idx, first - 1], vals[idx, first]
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(np.isfinite(v_out) & (v_in > v_out), (v_in - level) / (v_in - v_out), 0.0)
    dist = t[first - 1] + np.clip(frac, 0.0, 1.0) * step
    return np.stack([pr + np.sin(theta) * dist, pc + np.cos(theta) * dist], axis=1)


def patient_side(row: float, col: float, shape: tuple[int, int], directions: tuple[str, str] | None) -> str | None:
    """The patient's side ("L" or "R") a point of the stored pixel grid lies on, or None.

    ``row``, ``col``: original pixel indices (pixel centres at integers) of an image of ``shape`` (rows,
    columns); ``directions``: the principal patient directions of that stored grid in Patient Orientation
    (0020,0020) terms (PS3.3 C.7.6.1.1.1): (toward which increasing column index runs, toward which increasing
    row index runs), e.g. ("L", "F") for a PA chest shown as usual (:func:`grid_directions` reads it). The
    midline is taken at the image's centre line across the L/R axis (the patient is centred on the detector);
    a point on it, a grid with no L/R axis (a lateral view: A/P and H/F) or unknown ``directions`` give None.
    """
    if directions is None:
        return None
    across, down = directions
    rows, cols = shape
    for letter, offset in ((across, col - (cols - 1) / 2.0), (down, row - (rows - 1) / 2.0)):
        if letter in ("L", "R") and offset != 0:
            return letter if offset > 0 else ("R" if letter == "L" else "L")
    return None


def grid_directions(ds: Any, spec: Preprocessing) -> tuple[str, str] | None:
    """The principal patient directions (across, down) of ``ds``'s STORED pixel grid (see
    :func:`patient_side`): its Patient Orientation (0020,0020) when it has two values; else the model's
    orientation for its laterality (``spec.orientation``, one direction per axis), since :func:`orientation_matrix
    <appliance.pipeline.preprocess.orientation_matrix>` then takes the image as stored, in the model's orientation
    (the :class:`Transform` is the identity reorientation); else None (sides unknown, none reported)."""
    values = patient_orientation(ds)
    if values is not None:
        if len(values) == 2 and all(values):
            return values[0][0], values[1][0]
        return None
    declared = spec.orientation or {}
    side = laterality_of(ds)
    target = declared.get(side) if side in ("L", "R") else None  # type: ignore[call-overload]
    target = target or declared.get("*")
    if target is None or len(target.rows) != 1 or len(target.columns) != 1:
        return None
    return target.rows[0], target.columns[0]


def _separate(hm: np.ndarray, p: tuple[int, int], kept: list[tuple[int, int]], floor: float) -> bool:
    """Whether the map dips below ``p``'s contour level on the straight line from ``p`` to each of ``kept``."""
    level = floor + CONTOUR_FRACTION * (float(hm[p]) - floor)
    t = np.linspace(0.0, 1.0, 64)[None, :]
    k = np.asarray(kept, dtype=np.float64)
    rr = p[0] + (k[:, 0:1] - p[0]) * t
    cc = p[1] + (k[:, 1:2] - p[1]) * t
    return bool((_bilinear(hm, rr, cc).min(axis=1) < level).all())


def locate_all(hm: np.ndarray, tf: Transform, stride: int, directions: tuple[str, str] | None = None) -> list[Location]:
    """Every place of one heatmap (:func:`peaks`), strongest first, each with its peak and contour in original
    pixel indices of the stored grid (clipped to the image) and the patient side it lies on
    (:func:`patient_side` with ``directions``: the stored grid's, :func:`grid_directions`)."""
    rows, cols = tf.original_shape
    out = []
    for pr, pc, value in peaks(hm):
        poly = contour(hm, pr, pc, top=value)
        orow, ocol = tf.heatmap_to_original(pr, pc, stride)
        prow, pcol = tf.heatmap_to_original(poly[:, 0], poly[:, 1], stride)
        prow = np.clip(prow, 0, rows - 1)
        pcol = np.clip(pcol, 0, cols - 1)
        row, col = float(np.clip(orow, 0, rows - 1)), float(np.clip(ocol, 0, cols - 1))
        out.append(
            Location(
                row=row,
                col=col,
                contour=[(float(a), float(b)) for a, b in zip(prow, pcol, strict=True)],
                peak=value,
                side=patient_side(row, col, (rows, cols), directions),
            )
        )
    return out


def locate(hm: np.ndarray, tf: Transform, stride: int) -> Location:
    """The strongest place of one heatmap (:func:`locate_all`'s first)."""
    return locate_all(hm, tf, stride)[0]


def site_thresholds(manifest: Manifest, site: SiteOperatingPoint | None) -> dict[str, float]:
    """The labels of ``site`` that may judge ``manifest``'s findings: all of them when they lie within the
    manifest's ``threshold_range`` (:func:`engines.manifest.check_site_thresholds`), else none (logged: e.g. a
    bundle version installed after the operating point narrowed its range), so a site threshold never leaves the
    range the manifest was validated for."""
    if site is None or not site.thresholds:
        return {}
    try:
        check_site_thresholds(manifest, dict(site.thresholds))
    except ValueError as exc:
        log.warning(
            "site operating point not applied; the manifest's thresholds judge",
            bundle=manifest.bundle_id,
            version=manifest.version,
            operating_point_version=site.version,
            reason=str(exc),
        )
        return {}
    return {label: float(v) for label, v in site.thresholds.items()}


def image_findings(
    scores: np.ndarray,
    score_spec: OutputSpec,
    heatmaps: np.ndarray | None,
    heatmap_spec: OutputSpec | None,
    tf: Transform,
    urgent: Mapping[str, float] | None = None,
    site: Mapping[str, float] | None = None,
    directions: tuple[str, str] | None = None,
) -> tuple[list[Finding], dict[str, np.ndarray]]:
    """Findings for one image: scores (L,) raw outputs, heatmaps (L', h, w) raw outputs; ``urgent`` the
    manifest's urgent thresholds (label -> score): a positive finding at or above its label's is urgent;
    ``site`` the site thresholds already checked against the manifest (:func:`site_thresholds`): a label there
    is judged by it (``threshold_source`` "site"), the others by the manifest's ``thresholds``. A positive
    finding with a heatmap is marked at every place (:func:`locate_all`; ``directions``: the stored grid's patient
    directions, :func:`grid_directions`, for each place's side)."""
    urgent = urgent or {}
    site = site or {}
    probs = activate(scores, score_spec.activation)
    maps: dict[str, np.ndarray] = {}
    if heatmaps is not None and heatmap_spec is not None:
        act = activate(heatmaps, heatmap_spec.activation, axis=0)
        maps = {label: act[i] for i, label in enumerate(heatmap_spec.labels)}
    findings = []
    stride = int(heatmap_spec.stride or 1) if heatmap_spec is not None else 1
    for i, label in enumerate(score_spec.labels):
        source = THRESHOLD_SITE if label in site else THRESHOLD_MANIFEST
        thr = float(site[label]) if label in site else score_spec.threshold(label)
        score = float(probs[i])
        positive = score >= thr
        places = locate_all(maps[label], tf, stride, directions) if positive and label in maps else []
        flag = urgent.get(label)
        findings.append(
            Finding(
                label=label,
                score=score,
                threshold=thr,
                positive=positive,
                location=places[0] if places else None,
                locations=places,
                urgent=positive and flag is not None and score >= flag,
                urgent_threshold=flag,
                threshold_source=source,
            )
        )
    return findings, maps


def laterality(ds: Any) -> str | None:
    """Breast (or body) side of the image, "L" or "R", from :func:`appliance.pipeline.anatomy.laterality_of`
    (Image Laterality (0020,0062), frame-level Frame Laterality (0020,9072), series Laterality (0020,0060),
    PS3.3 C.8.11.7 / C.7.6.16.2.8 / C.7.3.1); "B" (both) and unknown give None."""
    side = laterality_of(ds)
    return side if side in ("L", "R") else None


def view_of(ds: Any) -> str | None:
    """The image's view as a defined term (e.g. "CC", "MLO", "PA"), from the same coded view the router uses
    (:func:`appliance.pipeline.anatomy.view_of`: View Code Sequence (0054,0220), else View Position
    (0018,5101), PS3.3 C.8.11.7 / C.8.11.5); a code with no defined term gives its Code Meaning."""
    return coded_view(ds).label


def per_breast(images: list[ImageResult]) -> dict[str, float]:
    """Per-breast score = max over that breast's views (views without laterality are left out)."""
    out: dict[str, float] = {}
    for img in images:
        if img.laterality in ("L", "R"):
            out[img.laterality] = max(out.get(img.laterality, 0.0), img.score)
    return out


def study_result(
    manifest: Manifest,
    study_uid: str,
    images: list[ImageResult],
    patient: dict[str, str] | None = None,
    operating_point_version: int | None = None,
) -> StudyResult:
    is_mmg = manifest.task == "mmg" or any(m.upper() == "MG" for m in manifest.applies_to.modalities)
    return StudyResult(
        study_instance_uid=study_uid,
        bundle_id=manifest.bundle_id,
        bundle_version=manifest.version,
        task=manifest.task,
        clinical_use=manifest.clinical_use,
        images=images,
        per_breast=per_breast(images) if is_mmg else None,
        study_score=max((img.score for img in images), default=0.0),
        patient=patient or {},
        operating_point_version=operating_point_version,
    )
