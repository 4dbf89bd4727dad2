"""Synthetic chest X-ray and mammography phantoms with known truth, written as realistic DICOM.

Why: real clinical images cannot ship with the box, yet the whole chain (DICOM decode, modality/VOI LUT,
MONOCHROME1, resize/pad, inference, heatmap back to image coordinates) must be checked against a truth we
know. Everything here is plain numpy; images are generated directly at the requested size so the truth is
in ORIGINAL pixel coordinates of each image.

Truth format (JSON-serialisable dict per image)::

    {"kind": "cxr" | "mmg", "rows": R, "columns": C,
     "labels": {"nodule": 0|1, "effusion": 0|1, "cardiomegaly": 0|1}   # or {"mass": 0|1} for mmg
     "findings": [
        {"kind": "nodule", "center_xy": [x, y], "radius": r},           # pixels: x = column index,
                                                                        # y = row index, pixel centres
                                                                        # at integers
        {"kind": "effusion", "side": "right"|"left", "level_y": y},     # patient side (PA: patient left
                                                                        # is on the image's right)
        {"kind": "cardiomegaly", "ctr": 0.62},                          # cardiothoracic ratio
        {"kind": "mass", "center_xy": [x, y], "radius": r},             # mmg
     ],
     "laterality": "L"|"R", "view": "CC"|"MLO"                          # mmg only
    }

The pixel array of a phantom is float32 in [0, 1] where bright = dense (more attenuation), the way a
MONOCHROME2 image is displayed; :func:`to_dicom` turns it into stored values (inverted for MONOCHROME1).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CHEST_SIZE_REAL = (2500, 2048)  # rows, columns: a typical DX detector
CHEST_SIZE_SMALL = (320, 256)  # not square on purpose: exercises keep-aspect + pad
MAMMO_SIZE_REAL = (3328, 2560)
MAMMO_SIZE_SMALL = (256, 208)

SOP_CLASS = {
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "CR": "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "MG": "1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography X-Ray Image Storage - For Presentation
}
CXR_LABELS = ("nodule", "effusion", "cardiomegaly")
MMG_LABELS = ("mass",)
MMG_VIEWS = (("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO"))

# Transfer syntaxes the writer knows, by short name.
TRANSFER_SYNTAX = {
    "explicit": "1.2.840.10008.1.2.1",  # Explicit VR Little Endian (uncompressed)
    "implicit": "1.2.840.10008.1.2",
    "j2k-lossless": "1.2.840.10008.1.2.4.90",  # pylibjpeg-openjpeg
    "rle": "1.2.840.10008.1.2.5",  # pydicom / pylibjpeg-rle / gdcm
    "jpeg-lossless": "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1, via GDCM (pydicom has no encoder)
    "jpegls-lossless": "1.2.840.10008.1.2.4.80",  # needs pyjpegls (optional)
}
UID_ROOT = "1.2.826.0.1.3680043.10.1138."  # synthetic-data root used only for phantoms


# --------------------------------------------------------------------------------------------------
# Small numpy helpers


def _grid(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y) as float32 broadcastable grids."""
    y = np.arange(rows, dtype=np.float32)[:, None]
    x = np.arange(cols, dtype=np.float32)[None, :]
    return x, y


def _smooth_noise(rng: np.random.Generator, rows: int, cols: int, cell: float) -> np.ndarray:
    """Band-limited noise in about [-1, 1]: random values on a coarse grid, bilinearly interpolated."""
    gr = max(2, int(np.ceil(rows / cell)) + 2)
    gc = max(2, int(np.ceil(cols / cell)) + 2)
    coarse = rng.standard_normal((gr, gc)).astype(np.float32)
    yy = np.linspace(0, gr - 2, rows, dtype=np.float32)
    xx = np.linspace(0, gc - 2, cols, dtype=np.float32)
    y0 = yy.astype(np.int64)
    x0 = xx.astype(np.int64)
    fy = (yy - y0)[:, None]
    fx = (xx - x0)[None, :]
    a = coarse[y0][:, x0]
    b = coarse[y0][:, x0 + 1]
    c = coarse[y0 + 1][:, x0]
    d = coarse[y0 + 1][:, x0 + 1]
    out = a * (1 - fx) * (1 - fy) + b * fx * (1 - fy) + c * (1 - fx) * fy + d * fx * fy
    return out / 2.0


def _soft_ellipse(x, y, cx: float, cy: float, ax: float, ay: float, edge: float) -> np.ndarray:
    """1 inside the ellipse, 0 outside, with a soft edge ``edge`` (fraction of the radius)."""
    r = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)
    return np.clip((1.0 - r) / max(edge, 1e-6), 0.0, 1.0).astype(np.float32)


def _blob(x, y, cx: float, cy: float, radius: float) -> np.ndarray:
    """A dense round lesion: flat core with a soft rim (like a nodule or mass on a radiograph)."""
    r = np.sqrt((x - cx) ** 2 + (y - cy) ** 2) / radius
    return np.clip(1.15 - r**2, 0.0, 1.0).astype(np.float32) ** 0.7


# --------------------------------------------------------------------------------------------------
# Chest


@dataclass
class Phantom:
    """A generated image (float32 [0, 1], bright = dense) and its truth (JSON-serialisable)."""

    pixels: np.ndarray
    truth: dict[str, Any] = field(default_factory=dict)


def chest_phantom(
    rows: int = CHEST_SIZE_SMALL[0],
    cols: int = CHEST_SIZE_SMALL[1],
    *,
    seed: int = 0,
    nodules: int | Sequence[tuple[float, float, float]] = 0,
    effusion: str | None = None,
    cardiomegaly: bool = False,
    noise: float = 0.02,
) -> Phantom:
    """A PA chest radiograph phantom.

    ``nodules``: a count (random placement inside the lung fields) or explicit ``(x, y, radius)`` in
    normalised image coordinates (0..1, radius as a fraction of the width). ``effusion``: None,
    "right", "left" or "both" (patient side). ``cardiomegaly``: heart wide (CTR ~0.6) instead of ~0.42.
    """
    rng = np.random.default_rng(seed)
    x, y = _grid(rows, cols)
    u = x / cols
    v = y / rows
    jitter = lambda s: float(rng.uniform(-s, s))  # noqa: E731

    img = np.full((rows, cols), 0.04, np.float32)  # air outside the body
    # torso (soft tissue)
    torso_cx = 0.5 + jitter(0.02)
    body = _soft_ellipse(u, v, torso_cx, 0.58, 0.46 + jitter(0.02), 0.62, 0.04)
    img += 0.36 * body
    # lung fields: darker (air) inside the thorax
    lung_cy = 0.46 + jitter(0.02)
    lung_ax, lung_ay = 0.15 + jitter(0.01), 0.30 + jitter(0.02)
    gap = 0.17 + jitter(0.01)
    lung_r = _soft_ellipse(u, v, torso_cx - gap, lung_cy, lung_ax, lung_ay, 0.08)  # image left = patient right
    lung_l = _soft_ellipse(u, v, torso_cx + gap, lung_cy, lung_ax, lung_ay, 0.08)
    lungs = np.maximum(lung_r, lung_l)
    img -= 0.24 * lungs
    # ribs: curved bright bands, only where the lungs are
    spacing = 0.062 + jitter(0.004)
    phase = float(rng.uniform(0, 1))
    curve = (np.abs(u - torso_cx) * 1.6) ** 2 * 0.9
    rib_v = (v - 0.16 + curve * 0.25) / spacing + phase
    ribs = np.clip(1.0 - np.abs(rib_v - np.round(rib_v)) / 0.22, 0, 1) ** 1.5
    img += 0.09 * ribs * lungs
    # spine / mediastinum
    spine = np.clip(1.0 - np.abs(u - torso_cx) / 0.055, 0, 1) * (v > 0.08) * body
    img += 0.22 * spine
    # heart: bright, lower centre, slightly to the patient's left (image right)
    thorax_width = 2 * (gap + lung_ax)
    ctr = float(rng.uniform(0.56, 0.66)) if cardiomegaly else float(rng.uniform(0.36, 0.46))
    heart_ax = ctr * thorax_width / 2
    heart_cx = torso_cx + 0.03
    heart_cy = lung_cy + 0.16
    heart = _soft_ellipse(u, v, heart_cx, heart_cy, heart_ax, 0.15, 0.12)
    img = img * (1 - heart) + (0.50 + jitter(0.02)) * heart
    # diaphragm / abdomen below the lungs
    abdomen = np.clip((v - (lung_cy + lung_ay * 0.92)) / 0.04, 0, 1) * body
    img = np.maximum(img, 0.40 * abdomen)

    findings: list[dict[str, Any]] = []
    labels = dict.fromkeys(CXR_LABELS, 0)
    if cardiomegaly:
        labels["cardiomegaly"] = 1
        findings.append({"kind": "cardiomegaly", "ctr": round(ctr, 3)})

    sides = {"right": [(lung_r, torso_cx - gap)], "left": [(lung_l, torso_cx + gap)]}
    sides["both"] = sides["right"] + sides["left"]
    if effusion:
        labels["effusion"] = 1
        for side_name, (mask, cx) in zip(
            ["right", "left"] if effusion == "both" else [effusion], sides[effusion], strict=True
        ):
            level = lung_cy + lung_ay * float(rng.uniform(0.35, 0.6))
            # meniscus: fluid climbs the lateral chest wall
            lateral = np.abs(u - cx) / lung_ax
            surface = level - 0.06 * lateral**2
            fluid = np.clip((v - surface) / 0.02, 0, 1) * (mask > 0.05)
            img = img * (1 - fluid) + 0.42 * fluid
            findings.append({"kind": "effusion", "side": side_name, "level_y": round(level * rows, 1)})

    if isinstance(nodules, int):
        specs: list[tuple[float, float, float]] = []
        for _ in range(nodules):
            for _try in range(100):
                side = rng.choice([-1, 1])
                nx = torso_cx + side * gap + float(rng.uniform(-0.7, 0.7)) * lung_ax
                ny = lung_cy + float(rng.uniform(-0.7, 0.55)) * lung_ay
                inside = ((nx - (torso_cx + side * gap)) / lung_ax) ** 2 + ((ny - lung_cy) / lung_ay) ** 2
                heart_d = ((nx - heart_cx) / heart_ax) ** 2 + ((ny - heart_cy) / 0.15) ** 2
                far = all(abs(nx - sx) + abs(ny - sy) > 0.12 for sx, sy, _ in specs)
                if inside < 0.6 and heart_d > 1.3 and far:
                    break
            specs.append((nx, ny, float(rng.uniform(0.018, 0.032))))
    else:
        specs = list(nodules)
    for nx, ny, nr in specs:
        cx, cy, r = float(nx) * cols, float(ny) * rows, float(nr) * cols
        img += (0.20 + jitter(0.03)) * _blob(x, y, cx, cy, r)
        findings.append({"kind": "nodule", "center_xy": [round(cx, 2), round(cy, 2)], "radius": round(r, 2)})
    if specs:
        labels["nodule"] = 1

    # anatomical texture (vessels/parenchyma), detector non-uniformity and quantum noise; own stream so
    # the same seed gives the same background whatever findings are added
    tex = np.random.default_rng([seed, 7])
    img += 0.035 * _smooth_noise(tex, rows, cols, cols / 24) * (0.3 + lungs)
    img += 0.02 * _smooth_noise(tex, rows, cols, cols / 4)
    img += noise * tex.standard_normal((rows, cols)).astype(np.float32)
    img = np.clip(img, 0.0, 1.0).astype(np.float32)
    truth = {"kind": "cxr", "rows": rows, "columns": cols, "labels": labels, "findings": findings}
    return Phantom(img, truth)


# --------------------------------------------------------------------------------------------------
# Mammography


def mammo_phantom(
    rows: int = MAMMO_SIZE_SMALL[0],
    cols: int = MAMMO_SIZE_SMALL[1],
    *,
    laterality: str = "L",
    view: str = "CC",
    seed: int = 0,
    masses: int | Sequence[tuple[float, float, float]] = 0,
    noise: float = 0.02,
) -> Phantom:
    """One mammography view. Chest wall at column 0 for L, at the last column for R (as displayed).

    ``masses``: a count (random placement inside the breast) or explicit ``(depth, y, radius)``:
    depth = distance from the chest wall as a fraction of the width, y normalised, radius fraction of width.
    """
    if laterality not in ("L", "R") or view not in ("CC", "MLO"):
        raise ValueError(f"laterality must be L/R and view CC/MLO, got {laterality}/{view}")
    rng = np.random.default_rng(seed)
    x, y = _grid(rows, cols)
    u = x / cols
    v = y / rows
    d = u if laterality == "L" else 1.0 - u  # distance from the chest wall
    reach = float(rng.uniform(0.72, 0.86))  # nipple distance
    cy = 0.5 if view == "CC" else 0.56
    half_h = float(rng.uniform(0.40, 0.46))
    breast = np.clip((1.0 - np.sqrt((d / reach) ** 2 + ((v - cy) / half_h) ** 2)) / 0.03, 0, 1)
    breast *= d >= 0
    img = np.full((rows, cols), 0.02, np.float32)
    # fatty background, fibroglandular tissue denser near the chest wall, thinner at the skin line
    thickness = np.clip(1.0 - (d / reach) ** 2, 0, 1) ** 0.5
    glandular = np.clip(0.5 + 0.8 * _smooth_noise(rng, rows, cols, cols / 14), 0, 1)
    glandular *= np.clip(1.2 - d / reach, 0, 1)
    img += breast * (0.18 + 0.12 * thickness + 0.22 * glandular)
    img += breast * 0.04 * _smooth_noise(rng, rows, cols, cols / 40)
    if view == "MLO":  # pectoral muscle: bright triangle in the upper chest-wall corner
        pect = np.clip(((0.26 - d) / 0.26 - v / 0.5) / 0.02, 0, 1)
        img = np.maximum(img, (0.62 + 0.04 * _smooth_noise(rng, rows, cols, cols / 10)) * pect)
    findings: list[dict[str, Any]] = []
    if isinstance(masses, int):
        specs: list[tuple[float, float, float]] = []
        for _ in range(masses):
            for _try in range(100):
                md = float(rng.uniform(0.12, 0.6)) * reach
                my = cy + float(rng.uniform(-0.6, 0.6)) * half_h
                inside = (md / reach) ** 2 + ((my - cy) / half_h) ** 2
                pect_ok = view != "MLO" or ((0.26 - md) / 0.26 - my / 0.5) < -0.15
                far = all(abs(md - sd) + abs(my - sy) > 0.15 for sd, sy, _ in specs)
                if inside < 0.55 and pect_ok and far:
                    break
            specs.append((md, my, float(rng.uniform(0.03, 0.05))))
    else:
        specs = list(masses)
    for md, my, mr in specs:
        mx = md if laterality == "L" else 1.0 - md
        px, py, r = float(mx) * cols, float(my) * rows, float(mr) * cols
        img += (0.24 + float(rng.uniform(-0.03, 0.03))) * _blob(x, y, px, py, r)
        findings.append({"kind": "mass", "center_xy": [round(px, 2), round(py, 2)], "radius": round(r, 2)})
    img += noise * rng.standard_normal((rows, cols)).astype(np.float32) * (0.3 + breast)
    img = np.clip(img, 0.0, 1.0).astype(np.float32)
    truth = {
        "kind": "mmg",
        "rows": rows,
        "columns": cols,
        "laterality": laterality,
        "view": view,
        "labels": {"mass": int(bool(specs))},
        "findings": findings,
    }
    return Phantom(img, truth)


# --------------------------------------------------------------------------------------------------
# DICOM


def synthetic_uid(*parts: object) -> str:
    """A deterministic UID under the phantom root (same inputs -> same UID)."""
    h = int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:16], "big")
    return (UID_ROOT + str(h))[:64]


@dataclass
class PatientInfo:
    """Synthetic patient identity: looks like PHI so de-identification can be tested. Not a real person."""

    name: str = "PHANTOM^JANE^Q"
    patient_id: str = "PH-000001"
    birth_date: str = "19700101"
    sex: str = "F"
    accession: str = "ACC000001"
    institution: str = "Phantom Clinic"
    referring: str = "REFERRER^ROBERT"


def to_dicom(
    pixels: np.ndarray,
    *,
    modality: str = "DX",
    patient: PatientInfo | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    instance_number: int = 1,
    series_number: int = 1,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    rescale: tuple[float, float] = (1.0, 0.0),
    pixel_spacing: tuple[float, float] = (0.15, 0.15),
    body_part: str = "CHEST",
    view_position: str = "PA",
    laterality: str | None = None,
    patient_orientation: tuple[str, str] | None = None,
    voi_lut: bool = False,
    transfer_syntax: str = "explicit",
    study_date: str = "20240102",
):
    """Build a realistic DX/CR/MG dataset from a phantom (float [0, 1], bright = dense).

    ``rescale`` = (slope, intercept) of the modality LUT; window centre/width are given in rescaled
    units and cover the image. ``voi_lut=True`` adds a VOI LUT Sequence (a gentle S-curve) besides the
    window. ``transfer_syntax`` is a key of :data:`TRANSFER_SYNTAX`.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID

    modality = modality.upper()
    if modality not in SOP_CLASS:
        raise ValueError(f"modality must be one of {sorted(SOP_CLASS)}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError("photometric must be MONOCHROME1 or MONOCHROME2")
    if not 8 <= bits_stored <= 16:
        raise ValueError("bits_stored must be 8..16")
    if transfer_syntax not in TRANSFER_SYNTAX:
        raise ValueError(f"transfer_syntax must be one of {sorted(TRANSFER_SYNTAX)}")
    patient = patient or PatientInfo()
    rows, cols = pixels.shape
    maxval = (1 << bits_stored) - 1
    stored = np.round(np.clip(pixels, 0, 1) * maxval).astype(np.uint16)
    if photometric == "MONOCHROME1":
        stored = (maxval - stored).astype(np.uint16)
    slope, intercept = rescale
    study_uid = study_uid or synthetic_uid("study", patient.patient_id, study_date)
    series_uid = series_uid or synthetic_uid("series", study_uid, series_number, modality)
    sop_uid = sop_uid or synthetic_uid("sop", series_uid, instance_number, pixels.shape, float(pixels.mean()))

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(SOP_CLASS[modality])
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = UID(TRANSFER_SYNTAX["explicit"])
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SOP_CLASS[modality]
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.ImageType = ["ORIGINAL", "PRIMARY"] if modality != "CR" else ["ORIGINAL", "PRIMARY", ""]
    now = _dt.datetime(2024, 1, 2, 10, 30, 0)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = patient.accession
    ds.Manufacturer = "Phantom Imaging (synthetic)"
    ds.InstitutionName = patient.institution
    ds.ReferringPhysicianName = patient.referring
    ds.StudyDescription = "PHANTOM " + ("MAMMO" if modality == "MG" else "CHEST")
    ds.SeriesDescription = f"{view_position} {laterality or ''}".strip()
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.BodyPartExamined = body_part
    ds.ViewPosition = view_position
    if patient_orientation:
        ds.PatientOrientation = list(patient_orientation)
    if modality == "MG":
        ds.ImageLaterality = laterality or "U"
        ds.Laterality = laterality or ""  # some MG modalities also fill series laterality
        ds.BreastImplantPresent = "NO"
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PositionerType = "MAMMOGRAPHIC"
        ds.ViewCodeSequence = DicomSequence([_view_code(view_position)])
    elif modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        if laterality:
            ds.ImageLaterality = laterality
    if modality in ("DX", "MG"):
        ds.ImagerPixelSpacing = [f"{pixel_spacing[0]:.4f}", f"{pixel_spacing[1]:.4f}"]
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1
        ds.DetectorType = "DIRECT"
        ds.BurnedInAnnotation = "NO"
    ds.PixelSpacing = [f"{pixel_spacing[0]:.4f}", f"{pixel_spacing[1]:.4f}"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleType = "US"
    lo = float(np.percentile(stored, 0.5)) * slope + intercept
    hi = float(np.percentile(stored, 99.5)) * slope + intercept
    lo, hi = min(lo, hi), max(lo, hi)
    ds.WindowCenter = f"{(lo + hi) / 2:.1f}"
    ds.WindowWidth = f"{max(hi - lo, 1.0):.1f}"
    ds.VOILUTFunction = "LINEAR"
    if voi_lut:
        n = 4096
        first = int(np.floor(lo))
        t = np.linspace(-4, 4, n)
        lut = np.round((1 / (1 + np.exp(-t))) * 65535).astype(np.uint16)
        item = Dataset()
        item.LUTDescriptor = [n, first, 16]
        item.LUTExplanation = "PHANTOM SIGMOID"
        item.add_new(0x00283006, "US", lut.tolist())  # LUTData
        ds.VOILUTSequence = DicomSequence([item])
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OW"
    if transfer_syntax == "implicit":
        ds.file_meta.TransferSyntaxUID = UID(TRANSFER_SYNTAX["implicit"])
    elif transfer_syntax == "jpeg-lossless":
        _compress_with_gdcm(ds, TRANSFER_SYNTAX["jpeg-lossless"])
    elif transfer_syntax != "explicit":
        ds.compress(TRANSFER_SYNTAX[transfer_syntax], stored, generate_instance_uid=False)
    return ds


def _view_code(view: str):
    from pydicom.dataset import Dataset

    codes = {"CC": ("R-10242", "cranio-caudal"), "MLO": ("R-10226", "medio-lateral oblique")}
    value, meaning = codes.get(view, ("R-10242", "cranio-caudal"))
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "SRT"
    item.CodeMeaning = meaning
    return item


def _compress_with_gdcm(ds, ts_uid: str) -> None:
    """JPEG Lossless (Process 14 SV1): pydicom has no encoder, GDCM does. Replaces PixelData in place."""
    import tempfile

    import gdcm
    import pydicom
    from pydicom.uid import UID

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.dcm", Path(tmp) / "out.dcm"
        ds.save_as(src, enforce_file_format=True)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(src))
        if not reader.Read():
            raise RuntimeError("GDCM could not read the uncompressed phantom")
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
        change.SetInput(reader.GetImage())
        if not change.Change():
            raise RuntimeError("GDCM could not encode JPEG Lossless")
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(dst))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        if not writer.Write():
            raise RuntimeError("GDCM could not write JPEG Lossless")
        out = pydicom.dcmread(dst)
    ds.PixelData = out.PixelData
    ds["PixelData"].is_undefined_length = True
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = UID(ts_uid)


def write_dicom(ds, path: Path | str) -> Path:
    """Write a dataset as a DICOM Part 10 file (with preamble and file meta)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------------------------------
# Studies


def chest_study(
    out_dir: Path | str,
    *,
    seed: int = 0,
    size: str | tuple[int, int] = "small",
    nodules: int | Sequence[tuple[float, float, float]] = 1,
    effusion: str | None = None,
    cardiomegaly: bool = False,
    modality: str = "DX",
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    rescale: tuple[float, float] = (1.0, 0.0),
    pixel_spacing: tuple[float, float] = (0.15, 0.15),
    transfer_syntax: str = "explicit",
    voi_lut: bool = False,
    patient: PatientInfo | None = None,
) -> dict[str, Any]:
    """Write a one-image chest study; return ``{"study_uid", "files": [path], "truth": [truth]}``.

    ``size``: "small" (320x256), "real" (2500x2048) or an explicit (rows, columns).
    """
    rows, cols = _size(size, CHEST_SIZE_SMALL, CHEST_SIZE_REAL)
    ph = chest_phantom(rows, cols, seed=seed, nodules=nodules, effusion=effusion, cardiomegaly=cardiomegaly)
    patient = patient or PatientInfo(patient_id=f"PH-{seed:06d}", accession=f"ACC{seed:06d}")
    study_uid = synthetic_uid("cxr-study", seed, rows, cols, modality, photometric, transfer_syntax)
    ds = to_dicom(
        ph.pixels,
        modality=modality,
        patient=patient,
        study_uid=study_uid,
        bits_stored=bits_stored,
        photometric=photometric,
        rescale=rescale,
        pixel_spacing=pixel_spacing,
        body_part="CHEST",
        view_position="PA",
        patient_orientation=("L", "F"),  # PA: columns run to patient left, rows to feet
        voi_lut=voi_lut,
        transfer_syntax=transfer_syntax,
    )
    path = write_dicom(ds, Path(out_dir) / f"cxr_{seed}" / f"{ds.SOPInstanceUID}.dcm")
    truth = dict(ph.truth, sop_instance_uid=ds.SOPInstanceUID, file=str(path))
    return {"study_uid": study_uid, "files": [str(path)], "truth": [truth]}


def mammo_study(
    out_dir: Path | str,
    *,
    seed: int = 0,
    size: str | tuple[int, int] = "small",
    masses: dict[str, int] | None = None,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 14,
    rescale: tuple[float, float] = (1.0, 0.0),
    pixel_spacing: tuple[float, float] = (0.07, 0.07),
    transfer_syntax: str = "explicit",
    patient: PatientInfo | None = None,
) -> dict[str, Any]:
    """Write a 4-view screening mammogram (RCC, LCC, RMLO, LMLO; one study UID).

    ``masses``: per breast ("L"/"R") the number of masses, e.g. ``{"L": 1}``; a mass shows on both
    views of its breast. Returns ``{"study_uid", "files": [4 paths], "truth": [4 truths]}``.
    """
    rows, cols = _size(size, MAMMO_SIZE_SMALL, MAMMO_SIZE_REAL)
    masses = masses or {}
    rng = np.random.default_rng(seed)
    # one set of masses per breast, shared by its CC and MLO views: same depth, own vertical position
    per_breast: dict[str, list[tuple[float, float, float]]] = {}
    for side in ("R", "L"):
        specs: list[tuple[float, float, float]] = []
        for _ in range(int(masses.get(side, 0))):
            for _try in range(100):
                depth = float(rng.uniform(0.15, 0.45))
                yy = float(rng.uniform(0.3, 0.7))
                if all(abs(depth - s[0]) + abs(yy - s[1]) > 0.2 for s in specs):
                    break
            specs.append((depth, yy, float(rng.uniform(0.03, 0.05))))
        per_breast[side] = specs
    patient = patient or PatientInfo(patient_id=f"PM-{seed:06d}", accession=f"ACM{seed:06d}")
    study_uid = synthetic_uid("mmg-study", seed, rows, cols, photometric, transfer_syntax)
    files, truths = [], []
    orient = {("R", "CC"): ("P", "L"), ("L", "CC"): ("A", "R"), ("R", "MLO"): ("P", "F"), ("L", "MLO"): ("A", "F")}
    for i, (lat, view) in enumerate(MMG_VIEWS):
        specs = [(d, yy + (0.06 if view == "MLO" else 0.0), r) for d, yy, r in per_breast[lat]]
        ph = mammo_phantom(rows, cols, laterality=lat, view=view, seed=seed * 10 + i, masses=specs)
        ds = to_dicom(
            ph.pixels,
            modality="MG",
            patient=patient,
            study_uid=study_uid,
            series_uid=synthetic_uid("mmg-series", study_uid),
            instance_number=i + 1,
            bits_stored=bits_stored,
            photometric=photometric,
            rescale=rescale,
            pixel_spacing=pixel_spacing,
            body_part="BREAST",
            view_position=view,
            laterality=lat,
            patient_orientation=orient[(lat, view)],
            transfer_syntax=transfer_syntax,
        )
        path = write_dicom(ds, Path(out_dir) / f"mmg_{seed}" / f"{lat}{view}_{ds.SOPInstanceUID}.dcm")
        files.append(str(path))
        truths.append(dict(ph.truth, sop_instance_uid=ds.SOPInstanceUID, file=str(path)))
    return {"study_uid": study_uid, "files": files, "truth": truths}


def _size(size: str | tuple[int, int], small: tuple[int, int], real: tuple[int, int]) -> tuple[int, int]:
    if size == "small":
        return small
    if size == "real":
        return real
    if isinstance(size, str):
        raise ValueError(f"size must be 'small', 'real' or (rows, cols), not {size!r}")
    rows, cols = size
    return int(rows), int(cols)
