"""What a radiographer sees: one Secondary Capture per input image, heatmap and findings burned in.

Many viewers show neither SR nor GSPS, but every viewer shows an image. The SC is uncompressed RGB
(Explicit VR Little Endian) in a new series of the same study, resampled to square physical pixels and at
most ``max_size`` pixels on its long side (it is a display aid; the SR carries full-resolution
coordinates). Bundles that are not for clinical use get a red "NOT FOR CLINICAL USE" banner.
Text is drawn with Pillow's bundled default font (Pillow: HPND licence).
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from appliance.pipeline import uids
from appliance.pipeline.postprocess import ImageResult, StudyResult
from appliance.pipeline.preprocess import pixel_spacing, plan_transform, resample
from appliance.pipeline.results_source import (
    copy_source_attributes,
    highdicom_header,
    patient_orientation,
    series_laterality,
)
from engines.manifest import Preprocessing

MANUFACTURER = "clinic-appliance"
SC_SERIES_NUMBER = 9902
BANNER = "NOT FOR CLINICAL USE"
OVERLAY_FLOOR = 0.3  # heatmap fraction (of floor..peak) below which nothing is tinted
OVERLAY_ALPHA = 0.5


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


def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def render(
    img: ImageResult, display: np.ndarray, spacing, result: StudyResult, max_size: int, factor: int = 1
) -> np.ndarray:
    """(rows, cols, 3) uint8: grayscale image, heatmap overlay of the strongest positive label, text.

    ``display`` may be a reduced-resolution decode: display pixel d is centred on original pixel d * factor.
    """
    if spacing is not None and factor != 1:
        spacing = (spacing[0] * factor, spacing[1] * factor)
    view_tf = plan_transform(display.shape, spacing, Preprocessing(target_size=(max_size, max_size)))
    if max(display.shape) <= max_size and (spacing is None or spacing[0] == spacing[1]):
        view_tf = plan_transform(display.shape, None, Preprocessing(target_size=display.shape, keep_aspect=False))

    gray = resample(display, view_tf)
    h, w = gray.shape
    rgb = np.repeat(gray[:, :, None], 3, axis=2)

    positives = [f for f in img.findings if f.positive and f.label in img.heatmaps]
    shown = max(positives, key=lambda f: f.score) if positives else None
    if shown is not None and img.transform is not None:
        hm = img.heatmaps[shown.label]
        # SC pixel index -> original pixel index -> tensor index -> heatmap cell (axis-aligned, separable)
        rows_o = ((np.arange(h) + 0.5) / view_tf.scale[0] - 0.5) * factor
        cols_o = ((np.arange(w) + 0.5) / view_tf.scale[1] - 0.5) * factor
        tr, tc = img.transform.to_tensor(rows_o, cols_o)
        s = img.heatmap_stride
        cr, cc = (tr + 0.5) / s - 0.5, (tc + 0.5) / s - 0.5
        vals = _interp_matrix(cr, hm.shape[0]) @ hm @ _interp_matrix(cc, hm.shape[1]).T
        lo, hi = float(hm.min()), float(hm.max())
        norm = np.clip((vals - lo) / max(hi - lo, 1e-6), 0, 1)
        alpha = OVERLAY_ALPHA * np.clip((norm - OVERLAY_FLOOR) / (1 - OVERLAY_FLOOR), 0, 1)[..., None]
        rgb = rgb * (1 - alpha) + _colormap(norm) * alpha

    out = Image.fromarray(np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(out)
    fpx = max(12, h // 40)
    font = _font(fpx)
    for f in positives:
        loc = f.location
        if loc is None:
            continue
        pts = [((c / factor + 0.5) * view_tf.scale[1], (r / factor + 0.5) * view_tf.scale[0]) for r, c in loc.contour]
        draw.line(pts + pts[:1], fill=(255, 255, 0), width=max(1, h // 400))
        x, y = (loc.col / factor + 0.5) * view_tf.scale[1], (loc.row / factor + 0.5) * view_tf.scale[0]
        d = max(4, h // 100)
        draw.line([(x - d, y), (x + d, y)], fill=(255, 255, 0), width=max(1, h // 400))
        draw.line([(x, y - d), (x, y + d)], fill=(255, 255, 0), width=max(1, h // 400))
    lines = [f"AI {result.bundle_id} {result.bundle_version}"]
    for f in sorted(img.findings, key=lambda f: -f.score):
        lines.append(f"{f.label}: {f.score:.2f}{'  POSITIVE' if f.positive else ''}")
    if result.per_breast and img.laterality in result.per_breast:
        lines.append(f"{img.laterality} breast score: {result.per_breast[img.laterality]:.2f}")
    top = 0
    if not result.clinical_use:
        bh = int(fpx * 1.6)
        draw.rectangle([0, 0, w, bh], fill=(200, 0, 0))
        draw.text((w // 2, bh // 2), BANNER, fill=(255, 255, 255), font=font, anchor="mm")
        top = bh
    y = top + fpx // 2
    for line in lines:
        draw.text((fpx // 2 + 1, y + 1), line, fill=(0, 0, 0), font=font)
        draw.text((fpx // 2, y), line, fill=(255, 255, 255), font=font)
        y += int(fpx * 1.3)
    return np.asarray(out)


def build_sc(
    img: ImageResult,
    src: Dataset,
    display: np.ndarray,
    result: StudyResult,
    index: int,
    max_size: int = 1024,
    factor: int = 1,
) -> hd.sc.SCImage:
    """The Secondary Capture Image (PS3.3 A.8.1) showing ``img``'s findings on ``src``, in a new series of
    its study.

    Patient and study attributes and the Specific Character Set are the source's, exactly
    (:func:`appliance.pipeline.results_source.copy_source_attributes`); Patient Orientation is the source's
    (zero length where it has none: Type 2, PS3.3 C.7.6.1); General Series Laterality (PS3.3 C.7.3.1, Type
    2C) is the image's side, absent for an unpaired body part, zero length where the side is not known.
    """
    spacing = pixel_spacing(src)
    pixels = render(img, display, spacing, result, max_size, factor)
    sc_spacing = None
    if spacing is not None:
        # square output pixels covering the same physical extent as the source image
        sc_spacing = (int(src.Rows) * spacing[0] / pixels.shape[0], int(src.Columns) * spacing[1] / pixels.shape[1])
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=highdicom_header(src),
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=uids.sc_series_uid(result.study_instance_uid, result.bundle_id, result.bundle_version),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=uids.sc_instance_uid(
            result.study_instance_uid,
            img.series_instance_uid,
            img.sop_instance_uid,
            result.bundle_id,
            result.bundle_version,
        ),
        instance_number=index + 1,
        manufacturer=MANUFACTURER,
        pixel_spacing=sc_spacing,
        # highdicom requires an orientation and accepts only single letters: replaced below by the source's
        patient_orientation=("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        specific_character_set=None,
    )
    set_sc_source_attributes(sc, src, img.laterality)
    banner = "" if result.clinical_use else " NOT FOR CLINICAL USE"
    sc.SeriesDescription = f"AI overlay {result.bundle_id} {result.bundle_version}{banner}"[:64]
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
