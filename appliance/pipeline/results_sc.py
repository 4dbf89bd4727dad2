"""What a radiographer sees: one Secondary Capture per input image, heatmap and findings burned in.

Many viewers show neither SR nor GSPS, but every viewer shows an image. The SC is uncompressed RGB
(Explicit VR Little Endian) in a new series of the same study, resampled to square physical pixels and at
most ``max_size`` pixels on its long side (it is a display aid; the SR carries full-resolution
coordinates). Bundles that are not for clinical use get a red "NOT FOR CLINICAL USE" banner; a study with an
urgent finding (the manifest's ``urgent`` thresholds) gets "URGENT: <label>, ..." in black on yellow across the
top of every one of its SCs (whichever image the radiographer opens first), above any other text.

What it says, on opaque black boxes (white text, 21:1 contrast: legible on any tissue), at a size that
scales with the image (the long side / 42 pixels): each positive finding's marker labelled "nodule 0.82",
the laterality and view ("L CC") with the bundle and the breast score in the darker top corner, and a
one-line plain summary at the bottom ("AI: nodule 0.82 (positive); effusion 0.03; NOT FOR CLINICAL USE").
The SCs of a study go to one series per laterality (left and right views never share a series).
Text is drawn with the scalable font embedded in Pillow >= 10.1 (Aileron Regular, CC0; Pillow: HPND licence).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from appliance.pipeline import uids
from appliance.pipeline.postprocess import Finding, ImageResult, StudyResult
from appliance.pipeline.preprocess import Transform, pixel_aspect, pixel_spacing, plan_transform, resample
from appliance.pipeline.results_source import (
    copy_source_attributes,
    highdicom_header,
    patient_orientation,
    series_laterality,
)
from engines.manifest import Preprocessing

MANUFACTURER = "clinic-appliance"
SC_SERIES_NUMBER = 9902  # images without laterality (a chest); lateral images get a series per side:
SC_SERIES_NUMBERS = {None: SC_SERIES_NUMBER, "R": 9903, "L": 9904}
BANNER = "NOT FOR CLINICAL USE"
OVERLAY_FLOOR = 0.3  # heatmap fraction (of floor..peak) below which nothing is tinted
OVERLAY_ALPHA = 0.5
# text size: the long side / 42, within these. MIN_FONT_PX is the smallest size whose capitals are at least
# MIN_CAP_HEIGHT_PX tall in the embedded font (Aileron: 18 px -> 13 px capitals, 4 px spaces; at 10 px, 8 px
# capitals and 2 px spaces read "NOT FORCLINICAL USE"), so text is legible on every SC the box writes.
MIN_CAP_HEIGHT_PX = 12
MIN_FONT_PX, MAX_FONT_PX = 18, 48
WHITE, BLACK = (255, 255, 255), (0, 0, 0)
BANNER_RED = (200, 0, 0)
URGENT_YELLOW = (255, 215, 0)  # black on it: 14.6:1 (WCAG 2 contrast)
MARKER = (255, 255, 0)


def _colormap(v: np.ndarray) -> np.ndarray:
    """Jet-like map of v in [0, 1] -> (..., 3) float RGB in [0, 1]."""
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return np.stack([r, g, b], axis=-1)


def _interp_matrix(pos: np.ndarray, n: int) -> np.ndarray:
    """(len(pos), n) linear-interpolation weights: separable bilinear sampling as two small matmuls."""
    p = np.clip(pos, 0, n - 1)
    i0 = np.minimum(np.floor(p).astype(np.int64), max(n - 2, 0))
    f = (p - i0).astype(np.float32)
    m = np.zeros((len(p), n), dtype=np.float32)
    rows = np.arange(len(p))
    m[rows, i0] = 1 - f
    m[rows, np.minimum(i0 + 1, n - 1)] += f
    return m


def _font(px: int) -> ImageFont.FreeTypeFont:
    """Pillow's embedded scalable font (Aileron Regular; Pillow >= 10.1) at ``px`` pixels. Loading takes
    ~0.05 ms, so each render loads its own (no FreeType face shared between the result pool's threads)."""
    font = ImageFont.load_default(size=px)
    if not isinstance(font, ImageFont.FreeTypeFont):  # Pillow built without FreeType: a fixed 11 px bitmap
        raise RuntimeError("Pillow lacks FreeType: the overlay text cannot be scaled")
    return font


# --------------------------------------------------------------------------------------------------
# What the overlay says


# Mammography views (PS3.16 CID 4014 "View for Mammography") -> the ACR abbreviation a radiographer reads.
# pydicom's Code compares SRT codes equal to their SNOMED CT counterparts.
_V = codes.cid4014
MG_VIEW_ABBREVIATIONS: tuple[tuple[Code, str], ...] = (
    (_V.CranioCaudal, "CC"),
    (_V.CranioCaudalExaggeratedLaterally, "XCCL"),
    (_V.CranioCaudalExaggeratedMedially, "XCCM"),
    (_V.CaudoCranial, "FB"),  # from below
    (_V.MedioLateralObliqueProjection, "MLO"),
    (_V.MedioLateralProjection, "ML"),
    (_V.LateroMedial, "LM"),
    (_V.LateroMedialOblique, "LMO"),
    (_V.SuperolateralToInferomedialOblique, "SIO"),
    (_V.InferomedialToSuperolateralOblique, "ISO"),
)


def _coded_view(src: Dataset) -> str | None:
    """The view of View Code Sequence (0054,0220) (PS3.3 C.8.11.5), abbreviated for display; its code
    meaning when the code is not a CID 4014 view."""
    seq = src.get("ViewCodeSequence") or []
    if not seq:
        return None
    item = seq[0]
    meaning = str(item.get("CodeMeaning", "")).strip()
    try:
        code = Code(str(item.CodeValue), str(item.CodingSchemeDesignator), meaning or "?")
    except (AttributeError, ValueError):
        return meaning[:24] or None
    return next((abbr for known, abbr in MG_VIEW_ABBREVIATIONS if code == known), meaning[:24] or None)


def image_caption(img: ImageResult, src: Dataset) -> str:
    """Laterality and view as a radiographer reads them on a film ("L CC", "R MLO", "PA"; PS3.3 C.7.6.2
    Image Laterality, C.8.11.5 View Code Sequence, C.8.11.7 View Position): empty when neither is known."""
    view = img.view or _coded_view(src)
    return " ".join(v for v in (img.laterality, view) if v)


def _ordered(img: ImageResult) -> list[Finding]:
    """Positive findings first, then by score, highest first."""
    return sorted(img.findings, key=lambda f: (not f.positive, -f.score))


def summary_line(img: ImageResult, result: StudyResult) -> str:
    """The one-line plain summary burned into the SC ("AI: nodule 0.82 (positive); effusion 0.03; NOT FOR
    CLINICAL USE"): every finding of this image with its score, positives first, then the images of the study the
    gate refused (:func:`not_applied_note`), the clinical-use notice last."""
    parts = [f"{f.label} {f.score:.2f}{' (positive)' if f.positive else ''}" for f in _ordered(img)]
    text = "AI: " + ("; ".join(parts) if parts else "no findings")
    if result.urgent_labels:
        text = f"{urgent_banner(result)}; {text}"
    if result.not_applied:
        text = f"{text}; {not_applied_note(result)}"
    return f"{text}; {BANNER}" if not result.clinical_use else text


def not_applied_note(result: StudyResult) -> str:
    """ "AI not applied to 2 other images: For Processing image (Presentation Intent Type), model takes For
    Presentation" (each distinct reason once); empty when the gate refused no image of the study."""
    if not result.not_applied:
        return ""
    n = len(result.not_applied)
    reasons = list(dict.fromkeys(item["reason"] for item in result.not_applied))
    noun = "image" if n == 1 else "images"
    return f"AI not applied to {n} other {noun}: {'; '.join(reasons)}"


def urgent_banner(result: StudyResult) -> str:
    """ "URGENT: effusion" (every urgent label of the study, comma-separated); empty when none is urgent."""
    return f"URGENT: {', '.join(result.urgent_labels)}" if result.urgent_labels else ""


@dataclass(frozen=True)
class TextBox:
    """One piece of text on the overlay: ``text`` (lines) drawn in ``fg`` on an opaque ``bg`` box ``box``
    (x0, y0, x1, y1 in SC pixels, end exclusive). ``kind``: banner, caption, info, label, summary."""

    kind: str
    lines: tuple[str, ...]
    box: tuple[int, int, int, int]
    fg: tuple[int, int, int]
    bg: tuple[int, int, int]
    font_px: int
    finding: str | None = None  # the finding a marker label names

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass(frozen=True)
class Marker:
    """A positive finding's marker in SC pixels: peak (x, y) and contour [(x, y), ...]."""

    finding: Finding
    peak: tuple[float, float]
    contour: list[tuple[float, float]]


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0)


def _bounds(m: Marker) -> tuple[int, int, int, int]:
    xs = [p[0] for p in m.contour] + [m.peak[0]]
    ys = [p[1] for p in m.contour] + [m.peak[1]]
    return int(min(xs)), int(min(ys)), int(np.ceil(max(xs))) + 1, int(np.ceil(max(ys))) + 1


def _clamped(
    xy: tuple[int, int], size: tuple[int, int], area: tuple[int, int, int, int]
) -> tuple[tuple[int, int, int, int], int]:
    """A box of ``size`` at ``xy`` moved inside ``area``, and how far it was moved."""
    (x, y), (bw, bh) = xy, size
    cx = min(max(x, area[0]), max(area[2] - bw, area[0]))
    cy = min(max(y, area[1]), max(area[3] - bh, area[1]))
    return (cx, cy, cx + bw, cy + bh), abs(cx - x) + abs(cy - y)


def _cost(placed: tuple[tuple[int, int, int, int], int], avoid: list[tuple[int, int, int, int]]) -> tuple[int, int]:
    """Area covered of what must stay visible, then the distance moved from the preferred place."""
    box, moved = placed
    return sum(_overlaps(box, a) for a in avoid), moved


def _block(font: ImageFont.FreeTypeFont, lines: list[str], pad: int) -> tuple[int, int, int]:
    """(width, height, line pitch) of a text block with ``pad`` pixels of backing around it."""
    asc, desc = font.getmetrics()
    pitch = asc + desc
    width = max((int(np.ceil(font.getlength(line))) for line in lines), default=0)
    return width + 2 * pad, pitch * len(lines) + 2 * pad, pitch


def wrap_text(font: ImageFont.FreeTypeFont, text: str, width: int, sep: str = "; ") -> list[str]:
    """Break ``text`` at ``sep`` so that each line fits ``width`` pixels (a part longer than that stays whole)."""
    lines: list[str] = []
    for part in text.split(sep):
        joined = f"{lines[-1]}{sep}{part}" if lines else part
        if lines and font.getlength(joined) <= width:
            lines[-1] = joined
        else:
            lines.append(part)
    return lines


def banner_lines(font: ImageFont.FreeTypeFont, text: str, width: int) -> tuple[str, ...]:
    """A banner's lines: ``text`` whole when it fits ``width`` pixels, else broken between words
    (:func:`wrap_text` at single spaces), never inside a word and never joining two: ``" ".join`` of the lines
    gives ``text`` back."""
    if font.getlength(text) <= width:
        return (text,)
    return tuple(wrap_text(font, text, width, sep=" "))


def layout(
    shape: tuple[int, int],
    gray: np.ndarray | None,
    img: ImageResult,
    result: StudyResult,
    markers: list[Marker],
    caption: str,
) -> list[TextBox]:
    """Where each text goes on an SC of ``shape`` (rows, cols); ``gray`` (the image, 0..1) picks the darker
    top corner for the caption block, so it covers air rather than tissue.

    Boxes: the yellow URGENT banner (top, full width) when the study has an urgent finding; the red NOT FOR
    CLINICAL USE banner (below it, full width) for non-clinical bundles; the caption block
    (laterality + view, bundle, breast score) in a top corner; one label per marker ("nodule 0.82") beside
    its contour, inside the image and clear of the other boxes; the summary line (bottom, full width; smaller
    type, then wrapped at "; ", when it does not fit). Text is white on black (21:1, WCAG 2 contrast) or
    white on the banner red (6:1): legible on any tissue.
    """
    h, w = shape
    long_side = max(h, w)
    fpx = int(np.clip(round(long_side / 42), MIN_FONT_PX, MAX_FONT_PX))
    font = _font(fpx)
    pad = max(2, fpx // 5)
    boxes: list[TextBox] = []
    top = 0
    urgent = urgent_banner(result)
    if urgent:
        upx = int(fpx * 1.25)
        while upx > MIN_FONT_PX and _font(upx).getlength(urgent) + 2 * pad > w:
            upx -= 1
        ulines = banner_lines(_font(upx), urgent, w - 2 * pad)
        bh = int(upx * 1.6) * len(ulines)
        boxes.append(TextBox("banner", ulines, (0, 0, w, bh), BLACK, URGENT_YELLOW, upx))
        top = bh
    if not result.clinical_use:
        blines = banner_lines(font, BANNER, w - 2 * pad)
        bh = int(fpx * 1.6) * len(blines)
        boxes.append(TextBox("banner", blines, (0, top, w, top + bh), WHITE, BANNER_RED, fpx))
        top += bh

    # summary: one line at the bottom; smaller type down to MIN_FONT_PX, then wrapped
    text = summary_line(img, result)
    spx = fpx
    while spx > MIN_FONT_PX and _font(spx).getlength(text) + 2 * pad > w:
        spx -= 1
    sfont = _font(spx)
    lines = [text] if sfont.getlength(text) + 2 * pad <= w else wrap_text(sfont, text, w - 2 * pad)
    _, sh, _ = _block(sfont, lines, pad)
    summary = TextBox("summary", tuple(lines), (0, max(top, h - sh), w, h), WHITE, BLACK, spx)
    boxes.append(summary)
    bottom = summary.box[1]

    # caption block in the darker top corner
    info = [f"AI {result.bundle_id} {result.bundle_version}"]
    if result.per_breast and img.laterality in result.per_breast:
        info.append(f"{img.laterality} breast score {result.per_breast[img.laterality]:.2f}")
    cpx = int(fpx * 1.5)
    cfont = _font(cpx)
    cw, ch, _ = _block(cfont, [caption], pad) if caption else (0, 0, 0)
    iw, ih, _ = _block(font, info, pad)
    bw = min(max(cw, iw), w)
    corners = [(0, top), (w - bw, top)]
    if gray is not None:
        corners.sort(key=lambda xy: float(gray[xy[1] : xy[1] + ch + ih, xy[0] : xy[0] + bw].mean()) if bw else 0.0)
    x0, y0 = corners[0]
    if caption:
        boxes.append(TextBox("caption", (caption,), (x0, y0, x0 + bw, y0 + ch), WHITE, BLACK, cpx))
    boxes.append(TextBox("info", tuple(info), (x0, y0 + ch, x0 + bw, y0 + ch + ih), WHITE, BLACK, fpx))

    # marker labels beside their contours, clear of the other boxes and of every marker
    avoid = [b.box for b in boxes] + [_bounds(m) for m in markers]
    for m in markers:
        text = f"{m.finding.label} {m.finding.score:.2f}"
        lw, lh, _ = _block(font, [text], pad)
        x0, y0, x1, y1 = _bounds(m)
        gap = max(3, fpx // 3)
        py, px = int(m.peak[1] - lh / 2), int(m.peak[0] - lw / 2)
        candidates = [(x1 + gap, py), (x0 - gap - lw, py), (px, y1 + gap), (px, y0 - gap - lh)]
        area = (0, top, w, bottom)
        box = min((_clamped(c, (lw, lh), area) for c in candidates), key=lambda bc: _cost(bc, avoid))[0]
        boxes.append(TextBox("label", (text,), box, WHITE, BLACK, fpx, m.finding.label))
        avoid.append(box)
    return boxes


def markers(img: ImageResult, scale: tuple[float, float], factor: int = 1) -> list[Marker]:
    """The positive located findings of ``img`` in SC pixel coordinates (x, y), one marker per place
    (``Finding.locations``) (``scale`` = SC pixels per display pixel, ``factor`` = original pixels per display
    pixel)."""
    out: list[Marker] = []
    for f in _ordered(img):
        if not f.positive:
            continue
        for loc in f.locations:  # every place the finding occurs, each with its own contour
            pts = [((c / factor + 0.5) * scale[1], (r / factor + 0.5) * scale[0]) for r, c in loc.contour]
            peak = ((loc.col / factor + 0.5) * scale[1], (loc.row / factor + 0.5) * scale[0])
            out.append(Marker(f, peak, pts))
    return out


def _draw_boxes(draw: ImageDraw.ImageDraw, boxes: list[TextBox]) -> None:
    for b in boxes:
        draw.rectangle([b.box[0], b.box[1], b.box[2] - 1, b.box[3] - 1], fill=b.bg)
        font = _font(b.font_px)
        if b.kind == "banner":  # each line centred in its own band of the box
            band = (b.box[3] - b.box[1]) / len(b.lines)
            for i, line in enumerate(b.lines):
                centre = ((b.box[0] + b.box[2]) // 2, int(b.box[1] + band * (i + 0.5)))
                draw.text(centre, line, fill=b.fg, font=font, anchor="mm")
            continue
        _, _, pitch = _block(font, list(b.lines), 0)
        pad = (b.box[3] - b.box[1] - pitch * len(b.lines)) // 2
        for i, line in enumerate(b.lines):
            draw.text((b.box[0] + pad, b.box[1] + pad + i * pitch), line, fill=b.fg, font=font)
        if b.kind == "label":
            draw.rectangle([b.box[0], b.box[1], b.box[2] - 1, b.box[3] - 1], outline=MARKER, width=1)


def _draw_marker(draw: ImageDraw.ImageDraw, m: Marker, h: int) -> None:
    """Contour and peak cross in yellow over a black edge, so that they show on bright tissue too."""
    lw = max(1, h // 400)
    d = max(4, h // 100)
    x, y = m.peak
    for colour, width in ((BLACK, lw + 2), (MARKER, lw)):
        draw.line(m.contour + m.contour[:1], fill=colour, width=width)
        draw.line([(x - d, y), (x + d, y)], fill=colour, width=width)
        draw.line([(x, y - d), (x, y + d)], fill=colour, width=width)


MIN_IMAGE_ROOM = 160  # px: an SC image shorter or narrower than this has no room for its text ...
MIN_CANVAS = 512  # ... so it is put on a black canvas at least this large (margin bottom / right)


def sc_view_transform(display: np.ndarray, spacing: Any, max_size: int, factor: int = 1) -> Transform:
    """Display image -> SC pixels: square pixels, long side <= ``max_size`` (identity when it already fits).
    ``content_shape`` is the image's size in the SC; a small one sits in a larger canvas (:data:`MIN_CANVAS`)."""
    if spacing is not None and factor != 1:
        spacing = (spacing[0] * factor, spacing[1] * factor)
    view_tf = plan_transform(display.shape, spacing, Preprocessing(target_size=(max_size, max_size)))
    if max(display.shape) <= max_size and (spacing is None or spacing[0] == spacing[1]):
        view_tf = plan_transform(display.shape, None, Preprocessing(target_size=display.shape, keep_aspect=False))
    return view_tf


def render_overlay(
    img: ImageResult,
    display: np.ndarray,
    spacing,
    result: StudyResult,
    max_size: int,
    factor: int = 1,
    caption: str = "",
) -> tuple[np.ndarray, list[TextBox]]:
    """(rows, cols, 3) uint8 and the text boxes drawn on it: grayscale image, heatmap overlay of the strongest
    positive label, a labelled marker per positive located finding, the caption (laterality + view; PS3.3
    C.7.6.2, C.8.11.5), the summary line (:func:`layout`). Burned In Annotation (0028,0301) (PS3.3 C.7.6.1): the SC
    says ``BurnedInAnnotation = YES``.

    ``display`` may be a reduced-resolution decode: display pixel d is centred on original pixel d * factor.
    An image shorter or narrower than :data:`MIN_IMAGE_ROOM` SC pixels keeps its place at the top left of a
    black canvas at least :data:`MIN_CANVAS` on each side, so the banner, caption, labels and summary have
    room and never cover it all.
    """
    view_tf = sc_view_transform(display, spacing, max_size, factor)
    content = resample(display, view_tf)
    h, w = content.shape
    room = MIN_CANVAS if min(h, w) < MIN_IMAGE_ROOM else 0
    gray = np.zeros((max(h, room), max(w, room)), dtype=content.dtype)
    gray[:h, :w] = content
    rgb = np.repeat(gray[:, :, None], 3, axis=2)

    positives = [f for f in img.findings if f.positive and f.label in img.heatmaps]
    shown = max(positives, key=lambda f: f.score) if positives else None
    if shown is not None and img.transform is not None:
        hm = img.heatmaps[shown.label]
        # SC pixel index -> original pixel index -> tensor index -> heatmap cell (axis-aligned, separable)
        rows_o = ((np.arange(h) + 0.5) / view_tf.scale[0] - 0.5) * factor
        cols_o = ((np.arange(w) + 0.5) / view_tf.scale[1] - 0.5) * factor
        # (a reoriented model input swaps the roles: stored rows then decide tensor columns)
        by_rows, by_cols = img.transform.stored_lines_to_tensor(rows_o, cols_o)
        s = img.heatmap_stride
        cr, cc = (by_rows + 0.5) / s - 0.5, (by_cols + 0.5) / s - 0.5
        if img.transform.transposed:
            vals = _interp_matrix(cr, hm.shape[1]) @ hm.T @ _interp_matrix(cc, hm.shape[0]).T
        else:
            vals = _interp_matrix(cr, hm.shape[0]) @ hm @ _interp_matrix(cc, hm.shape[1]).T
        lo, hi = float(hm.min()), float(hm.max())
        norm = np.clip((vals - lo) / max(hi - lo, 1e-6), 0, 1)
        alpha = OVERLAY_ALPHA * np.clip((norm - OVERLAY_FLOOR) / (1 - OVERLAY_FLOOR), 0, 1)[..., None]
        rgb[:h, :w] = rgb[:h, :w] * (1 - alpha) + _colormap(norm) * alpha

    out = Image.fromarray(np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(out)
    marks = markers(img, view_tf.scale, factor)
    for m in marks:
        _draw_marker(draw, m, h)
    boxes = layout(gray.shape, gray, img, result, marks, caption)
    _draw_boxes(draw, boxes)
    return np.asarray(out), boxes


def build_sc(
    img: ImageResult,
    src: Dataset,
    display: np.ndarray,
    result: StudyResult,
    index: int,
    max_size: int = 1024,
    factor: int = 1,
) -> hd.sc.SCImage:
    """The Secondary Capture Image (PS3.3 A.8.1) showing ``img``'s findings on ``src`` (see :func:`render_overlay`),
    in a new series of its study.

    One SC series per laterality (General Series Laterality, PS3.3 C.7.3.1, is a series attribute): the
    left and right views of a mammogram go to two series, never mixed; images without laterality share
    the study's one SC series. Patient and study attributes and the Specific Character Set are the
    source's, exactly (:func:`appliance.pipeline.results_source.copy_source_attributes`); Patient
    Orientation is the source's (zero length where it has none: Type 2, PS3.3 C.7.6.1); General Series
    Laterality (Type 2C) is the image's side, absent for an unpaired body part, zero length where the side
    is not known.
    """
    spacing = pixel_spacing(src)
    aspect = pixel_aspect(src)  # the spacing, else Pixel Aspect Ratio: square pixels on the SC either way
    pixels, _ = render_overlay(img, display, aspect, result, max_size, factor, image_caption(img, src))
    sc_spacing = None
    if spacing is not None:
        # square output pixels covering the same physical extent as the source image (a margin added to a
        # small image has the same pixel size)
        ch, cw = sc_view_transform(display, spacing, max_size, factor).content_shape
        sc_spacing = (int(src.Rows) * spacing[0] / ch, int(src.Columns) * spacing[1] / cw)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=highdicom_header(src),
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=uids.sc_series_uid(
            result.study_instance_uid, result.bundle_id, result.bundle_version, img.laterality
        ),
        series_number=SC_SERIES_NUMBERS.get(img.laterality, SC_SERIES_NUMBER),
        sop_instance_uid=uids.sc_instance_uid(
            result.study_instance_uid,
            img.series_instance_uid,
            img.sop_instance_uid,
            result.bundle_id,
            result.bundle_version,
        ),
        instance_number=index + 1,
        manufacturer=MANUFACTURER,
        pixel_spacing=sc_spacing,  # type: ignore[arg-type]  # highdicom hints int; PixelSpacing is DS (mm)
        # highdicom requires an orientation and accepts only single letters: replaced below by the source's
        patient_orientation=("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        specific_character_set=None,
    )
    set_sc_source_attributes(sc, src, img.laterality)
    banner = "" if result.clinical_use else " NOT FOR CLINICAL USE"
    side = f" {img.laterality}" if img.laterality else ""
    sc.SeriesDescription = f"AI overlay{side} {result.bundle_id} {result.bundle_version}{banner}"[:64]
    sc.BurnedInAnnotation = "YES"
    sc.DerivationDescription = f"AI heatmap and findings by {result.bundle_id} {result.bundle_version}"[:1024]
    ref = Dataset()
    ref.ReferencedSOPClassUID = src.SOPClassUID
    ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    return sc


def set_sc_source_attributes(sc: hd.sc.SCImage, src: Dataset, laterality: str | None) -> None:
    """What an SC takes from its source image (PS3.3 A.8.1): the Patient and study modules and Specific
    Character Set exactly (PS3.3 C.7.1.1, C.7.2.1, C.12.1.1.2), Patient Orientation (C.7.6.1.1.1; the SC's
    pixels are the source's, resampled, neither rotated nor flipped) with Anatomical Orientation Type, Body
    Part Examined, and General Series Laterality (C.7.3.1, Type 2C;
    :func:`~appliance.pipeline.results_source.series_laterality`)."""
    copy_source_attributes(sc, src)
    sc.PatientOrientation = patient_orientation(src)
    if "AnatomicalOrientationType" in src:
        sc.AnatomicalOrientationType = src.AnatomicalOrientationType
    body_part = src.get("BodyPartExamined")
    if body_part:
        sc.BodyPartExamined = body_part
    side = series_laterality(body_part, laterality)
    if side is not None:
        sc.Laterality = side
