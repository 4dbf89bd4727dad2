"""The "AI not applied" notice: a Secondary Capture (PS3.3 A.8.1) for the PACS of a study that a bundle's modality
matched but whose every image its input gate refused (study state ``not_analysed``).

Every viewer shows an SC, so the radiologist reading the study sees, beside the images, that the AI did not run
and why: "AI not applied" in large type, the bundle and version, and one line per refused image (laterality and
view, SOP Instance UID tail, the reason in the standard's terms), white on black (21:1), with the red NOT FOR
CLINICAL USE banner for non-clinical bundles; drawn with ``results_sc``'s font and boxes. Patient and study come
from the first refused image exactly (``results_source.copy_source_attributes``); the UIDs derive from the refused
images and the bundle version (``uids.notice_instance_uid``), so a re-run never duplicates the notice in the PACS.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from appliance.pipeline import uids
from appliance.pipeline.anatomy import laterality_of, view_of
from appliance.pipeline.results_sc import (
    BANNER,
    BANNER_RED,
    BLACK,
    MANUFACTURER,
    WHITE,
    TextBox,
    _draw_boxes,
    _font,
    set_sc_source_attributes,
    wrap_text,
)
from appliance.pipeline.results_source import highdicom_header
from appliance.pipeline.router import Refusal
from engines.manifest import Manifest

NOTICE_SERIES_NUMBER = 9905
NOTICE_WIDTH = 1024  # pixels; the height follows the text
TITLE = "AI not applied"


def notice_lines(manifest: Manifest, refused: list[tuple[Dataset, Refusal]]) -> list[str]:
    """The text of the notice, one entry per line before wrapping: the bundle, then per refused image its
    laterality and view (when known), its SOP Instance UID tail and the reason."""
    lines = [f"{manifest.bundle_id} {manifest.version}: {manifest.title}"]
    for ds, why in refused:
        side, view = laterality_of(ds), view_of(ds).term
        what = " ".join(v for v in (side, view) if v)
        uid = str(ds.get("SOPInstanceUID", "") or "")
        lines.append(f"image {what + ' ' if what else ''}…{uid[-12:]}: {why.reason}")
    return lines


def render_notice(manifest: Manifest, refused: list[tuple[Dataset, Refusal]]) -> tuple[np.ndarray, list[TextBox]]:
    """The notice's pixels, (rows, NOTICE_WIDTH, 3) uint8 RGB, and its text boxes (for contrast checks)."""
    w = NOTICE_WIDTH
    fpx, pad = 24, 8
    font = _font(fpx)
    boxes: list[TextBox] = []
    top = 0
    if not manifest.clinical_use:
        bh = int(fpx * 1.6)
        boxes.append(TextBox("banner", (BANNER,), (0, 0, w, bh), WHITE, BANNER_RED, fpx))
        top = bh
    th = int(fpx * 2 * 1.5)
    boxes.append(TextBox("caption", (TITLE,), (0, top, w, top + th), WHITE, BLACK, fpx * 2))
    top += th
    body: list[str] = []
    for line in notice_lines(manifest, refused):
        body.extend(wrap_text(font, line, w - 2 * pad, sep=" "))
    lh = int(fpx * 1.3)
    bh = len(body) * lh + 2 * pad
    boxes.append(TextBox("info", tuple(body), (0, top, w, top + bh), WHITE, BLACK, fpx))
    h = top + bh
    out = Image.new("RGB", (w, h), BLACK)
    _draw_boxes(ImageDraw.Draw(out), boxes)
    return np.asarray(out), boxes


def build_notice(manifest: Manifest, refused: list[tuple[Dataset, Refusal]]) -> hd.sc.SCImage:
    """The "AI not applied" Secondary Capture of one study and bundle; ``refused`` (non-empty) are the images the
    gate refused with their reasons, in arrival order. Raises ValueError when ``refused`` is empty."""
    if not refused:
        raise ValueError("a notice needs at least one refused image")
    src = refused[0][0]
    study_uid = str(src.StudyInstanceUID)
    keys = [
        uids.image_key(study_uid, str(ds.get("SeriesInstanceUID", "") or ""), str(ds.SOPInstanceUID))
        for ds, _ in refused
    ]
    pixels, _ = render_notice(manifest, refused)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=highdicom_header(src),
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=uids.notice_series_uid(study_uid, manifest.bundle_id, manifest.version),
        series_number=NOTICE_SERIES_NUMBER,
        sop_instance_uid=uids.notice_instance_uid(study_uid, keys, manifest.bundle_id, manifest.version),
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=("L", "F"),  # replaced below by the source's (Type 2)
        transfer_syntax_uid=ExplicitVRLittleEndian,
        specific_character_set=None,
    )
    set_sc_source_attributes(sc, src, None)
    banner = "" if manifest.clinical_use else " NOT FOR CLINICAL USE"
    sc.SeriesDescription = f"AI not applied {manifest.bundle_id} {manifest.version}{banner}"[:64]
    sc.BurnedInAnnotation = "YES"
    reasons = "; ".join(dict.fromkeys(why.reason for _, why in refused))
    sc.DerivationDescription = f"{TITLE}: {reasons}"[:1024]
    sc.add_new(0x00200020, "CS", None)  # Patient Orientation: a text page has none (Type 2: zero length)
    return sc
