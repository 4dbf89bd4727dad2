"""The grayscale chain (PS3.3 C.11, PS3.4 N.2): modality LUT -> VOI -> presentation, in every combination.

References: pydicom's ``apply_modality_lut`` / ``apply_windowing`` / ``apply_voi`` / ``apply_presentation_lut``
(over pydicom's bundled test files and synthetic LUT families) and dcmtk's renderer ``dcm2pnm`` (a conformant
viewer: what it shows is what the model must see). The field cases (``tests/cases``) run through the REAL
reference bundles.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_presentation_lut, apply_voi, apply_windowing
from pydicom.sequence import Sequence

from appliance.pipeline.preprocess import (
    NotProcessable,
    decode,
    grayscale,
    modality_lut,
    presentation_inverts,
    voi,
    window,
)
from engines.manifest import Preprocessing
from testsupport.pipeline import make_dataset, save
from testsupport.reference import findings, model_input, reference_engines, write_case

DICOM = Preprocessing(target_size=(64, 64), window="dicom")
TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"


def _corpus() -> list[str]:
    """pydicom's bundled single-frame grayscale files (local only: nothing is downloaded)."""
    names = []
    for f in sorted(TEST_FILES.rglob("*")):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            frames = int(ds.get("NumberOfFrames", 1) or 1)
        except Exception:  # not DICOM, or a broken header: not a grayscale image to compare on
            continue
        mono = str(ds.get("PhotometricInterpretation", "")) in ("MONOCHROME1", "MONOCHROME2")
        if "Rows" in ds and mono and frames == 1 and int(ds.get("BitsAllocated", 0)) in (8, 16):
            names.append(str(f.relative_to(TEST_FILES)))
    return names


CORPUS = _corpus()


def _unit(ref: np.ndarray, ds: Dataset) -> np.ndarray:
    """pydicom's window output (range [y_min, y_max] from Bits Stored and rescale) -> [0, 1]."""
    lo, hi = apply_windowing(np.array([-1e12, 1e12]), ds)
    return (ref - lo) / (hi - lo)


def test_corpus_is_there() -> None:
    assert len(CORPUS) >= 40  # CT, MR, CR (MONOCHROME1), every transfer syntax


@pytest.mark.parametrize("name", CORPUS)
def test_chain_matches_pydicom_over_its_corpus(name: str) -> None:
    ds = pydicom.dcmread(TEST_FILES / name)
    try:
        stored = decode(ds)
    except NotProcessable:
        pytest.skip("no decoder here for this transfer syntax (refused with a reason, tested elsewhere)")
    ours = modality_lut(ds, stored)
    np.testing.assert_allclose(ours, apply_modality_lut(stored, ds), rtol=1e-6, atol=1e-3)
    got = voi(ds, stored, DICOM)
    if "WindowCenter" in ds:
        ref = _unit(apply_windowing(apply_modality_lut(stored, ds), ds), ds)
        np.testing.assert_allclose(got, ref, atol=2e-5)
    else:  # no VOI in the header: the image's own range
        v = ours.astype(np.float64)
        np.testing.assert_allclose(got, (v - v.min()) / max(v.max() - v.min(), 1e-6), atol=2e-5)
    _, view = grayscale(ds, stored, DICOM)
    expected = 1.0 - got if ds.PhotometricInterpretation == "MONOCHROME1" else got
    np.testing.assert_array_equal(view, expected.astype(np.float32))


# ---- windows ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize(("center", "width"), [(2048.0, 4096.0), (1000.5, 1.0), (300.0, 37.5), (-100.0, 400.0)])
@pytest.mark.parametrize("signed", [False, True])
def test_window_functions_match_pydicom(function: str, center: float, width: float, signed: bool) -> None:
    ds = make_dataset(np.zeros((16, 16), np.uint16), window=(center, width))
    ds.VOILUTFunction = function
    ds.PixelRepresentation = int(signed)
    x = np.arange(-2048, 4096, 0.5, dtype=np.float32)
    np.testing.assert_allclose(window(x, center, width, function), _unit(apply_windowing(x, ds), ds), atol=2e-6)


def test_linear_width_below_one_is_invalid_and_falls_back_to_the_image_range() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        window(np.zeros(3, np.float32), 10.0, 0.5, "LINEAR")
    ds = make_dataset(np.arange(256, dtype=np.uint16).reshape(16, 16), window=(10.0, 0.5))
    got = voi(ds, ds.pixel_array, DICOM)
    assert float(got.min()) == 0.0 and float(got.max()) == 1.0 and len(np.unique(got)) == 256


# ---- LUTs in every VR and bit depth ------------------------------------------------------------------------

TS_FLAG = {"explicit": None, "implicit": "+ti", "big": "+tb"}


def _lut_file(tmp_path: Path, lut: np.ndarray, first: int, desc_bits: int, vr: str, syntax: str) -> Path:
    """A 12-bit ramp image whose only VOI transform is the given VOI LUT, written in ``syntax`` (dcmconv)."""
    ramp = (np.arange(64 * 64, dtype=np.uint16) % 4096).reshape(64, 64)
    ds = make_dataset(ramp)
    item = Dataset()
    item.LUTDescriptor = [len(lut) % 65536, first, desc_bits]
    if vr == "OW":
        item.add_new(0x00283006, "OW", lut.astype("<u2").tobytes())
    elif vr == "SS":
        item.add_new(0x00283006, "SS", lut.astype(np.uint16).view(np.int16).tolist())
    else:
        item.add_new(0x00283006, "US", lut.astype(np.uint16).tolist())
    ds.VOILUTSequence = Sequence([item])
    path = save(ds, tmp_path / f"lut-{vr}.dcm")
    if TS_FLAG[syntax]:
        out = tmp_path / f"lut-{vr}-{syntax}.dcm"
        subprocess.run(["dcmconv", TS_FLAG[syntax], str(path), str(out)], check=True, capture_output=True)
        path = out
    return path


SHAPES = {
    "ramp": lambda t: t,
    "inverting": lambda t: 1.0 - t,
    "gamma": lambda t: t**0.5,
    "sigmoid": lambda t: 1.0 / (1.0 + np.exp(-8.0 * (t - 0.5))),
}


@pytest.mark.parametrize(("vr", "syntax"), [("US", "explicit"), ("SS", "explicit"), ("OW", "explicit"),
                                            ("US", "implicit"), ("OW", "big")])  # fmt: skip
@pytest.mark.integration
@pytest.mark.parametrize(("desc_bits", "data_bits"), [(8, 8), (10, 10), (12, 12), (16, 16), (16, 12), (16, 10)])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_voi_lut_every_vr_and_depth(tmp_path: Path, vr: str, syntax: str, desc_bits: int, data_bits: int, shape: str):
    """Output = LUT entry / top of the range the data use: the LUT reference formula, pydicom's ``apply_voi``
    over that top, and (OW in implicit VR, big endian) no exception."""
    n, first = 3000, 500
    top = 2**data_bits - 1
    lut = np.round(np.clip(SHAPES[shape](np.linspace(0, 1, n)), 0, 1) * top).astype(np.int64)
    ds = pydicom.dcmread(_lut_file(tmp_path, lut, first, desc_bits, vr, syntax))
    stored = ds.pixel_array
    got = voi(ds, stored, DICOM)
    expected = lut[np.clip(stored.astype(np.int64) - first, 0, n - 1)] / top
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert got.max() >= 0.98  # full contrast whatever the descriptor says
    # pydicom reads US and OW LUT Data (not SS: negative int16 into uint16), and holds 8-bit LUTs' indices in
    # uint8 (so a 3000-entry 8-bit LUT is read only to entry 255): compared where it is right
    if vr != "SS" and desc_bits > 8:
        np.testing.assert_allclose(got * top, apply_voi(stored, ds), atol=1e-3)


@pytest.mark.integration
def test_narrow_voi_lut_matches_dcmtk_ignoring_the_descriptor_depth(tmp_path: Path) -> None:
    """dcmtk ``+Mv`` (determine the LUT depth from the data) renders what we feed the model; dcmtk trusting
    the descriptor (16 bits over 12-bit data) renders it near black: the field case's fault."""
    lut = np.round(np.linspace(0, 1, 4096) ** 0.9 * 4095).astype(np.int64)
    path = _lut_file(tmp_path, lut, 0, 16, "US", "explicit")
    ds = pydicom.dcmread(path)
    _, view = grayscale(ds, ds.pixel_array, DICOM)
    shown = _dcm2pnm(path, tmp_path, "+Wl", "1", "+Mv")
    assert np.abs(view * 255.0 - shown).max() <= 1.0
    assert _dcm2pnm(path, tmp_path, "+Wl", "1").max() <= 16  # what a descriptor-trusting renderer shows


def test_first_mapped_value_negative_and_signed_input() -> None:
    """CT-like: signed stored values, rescale to HU, VOI LUT starting at -1024 (descriptor SS)."""
    stored = np.arange(-1100, 3000, dtype=np.int16)[: 64 * 64].reshape(64, 64)
    ds = make_dataset(np.zeros((64, 64), np.uint16))
    ds.PixelRepresentation = 1
    item = Dataset()
    item.LUTDescriptor = [2048, -1024, 16]
    lut = np.arange(2048, dtype=np.int64) * 32
    item.LUTData = lut.tolist()
    ds.VOILUTSequence = Sequence([item])
    got = voi(ds, stored, DICOM)
    expected = lut[np.clip(stored.astype(np.int64) + 1024, 0, 2047)] / 65535.0
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(got * 65535.0, apply_voi(stored, ds), atol=1e-2)


@pytest.mark.parametrize("vr", ["US", "OW"])
def test_modality_lut_sequence_matches_pydicom(vr: str) -> None:
    stored = (np.arange(64 * 64, dtype=np.uint16) % 1200).reshape(64, 64)
    ds = make_dataset(stored)
    item = Dataset()
    item.LUTDescriptor = [1000, 100, 16]
    lut = (np.arange(1000) * 3 + 7).astype(np.uint16)
    if vr == "OW":
        item.add_new(0x00283006, "OW", lut.astype("<u2").tobytes())
    else:
        item.LUTData = lut.tolist()
    item.ModalityLUTType = "US"
    ds.ModalityLUTSequence = Sequence([item])
    np.testing.assert_array_equal(modality_lut(ds, stored), apply_modality_lut(stored, ds).astype(np.float32))


def test_malformed_lut_is_not_processable_with_reason() -> None:
    ds = make_dataset(np.zeros((16, 16), np.uint16))
    item = Dataset()
    item.LUTDescriptor = [16, 0]
    item.LUTData = list(range(16))
    ds.VOILUTSequence = Sequence([item])
    with pytest.raises(NotProcessable, match="invalid descriptor"):
        grayscale(ds, ds.pixel_array, DICOM)


# ---- presentation: Presentation LUT Shape together with the Photometric Interpretation ---------------------

COMBOS = [  # (photometric, Presentation LUT Shape or None) -> the display inverts the VOI output
    ("MONOCHROME2", None, False),
    ("MONOCHROME2", "IDENTITY", False),
    ("MONOCHROME2", "INVERSE", True),
    ("MONOCHROME1", None, True),
    ("MONOCHROME1", "INVERSE", True),  # DX/MG as written: one inversion, not two
    ("MONOCHROME1", "IDENTITY", False),  # the shape decides: its output is P-values
]


def _dcm2pnm(path: Path, tmp_path: Path, *opts: str) -> np.ndarray:
    out = tmp_path / "shown.pgm"
    subprocess.run(["dcm2pnm", *opts, str(path), str(out)], check=True, capture_output=True)
    return np.asarray(Image.open(out), dtype=np.float64)


@pytest.mark.integration
@pytest.mark.parametrize(("photometric", "shape", "inverts"), COMBOS)
def test_presentation_combinations_match_dcmtk(tmp_path: Path, photometric: str, shape: str | None, inverts: bool):
    img = (np.arange(64 * 64, dtype=np.uint16) % 4096).reshape(64, 64)
    ds = make_dataset(img, photometric=photometric, window=(2048.0, 4096.0))
    if shape:
        ds.PresentationLUTShape = shape
    path = save(ds, tmp_path / "p.dcm")
    assert presentation_inverts(ds) is inverts
    model, view = grayscale(ds, ds.pixel_array, DICOM)
    shown = _dcm2pnm(path, tmp_path, "+Wi", "1")
    assert np.abs(view * 255.0 - shown).max() <= 1.0  # exactly what dcmtk displays
    np.testing.assert_array_equal(model, view)
    raw, _ = grayscale(ds, ds.pixel_array, Preprocessing(target_size=(64, 64), invert_monochrome1=False))
    np.testing.assert_array_equal(view, 1.0 - raw if inverts else raw)
    if shape:  # pydicom's apply_presentation_lut on the VOI output (range [0, 1]: its top included)
        ref = apply_presentation_lut(np.append(raw.ravel(), 1.0), ds)[:-1].reshape(raw.shape)
        if photometric == "MONOCHROME2" or shape == "INVERSE":
            np.testing.assert_allclose(view, ref, atol=1e-6)


# ---- the field cases through the reference models --------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    settings, engines = reference_engines(tmp_path_factory.mktemp("home"))
    yield settings, engines
    engines.close()


@pytest.mark.integration
def test_case_voi_lut_narrow_output(reference, tmp_path: Path) -> None:
    """Right outcome: full contrast (as the same image with a plain window), the nodule found, no false finding."""
    settings, engines = reference
    case = write_case("voi_lut_narrow_output", tmp_path / "case.dcm")
    ds = pydicom.dcmread(case)
    plain = ds.copy()
    del plain.VOILUTSequence
    lo, hi = np.percentile(ds.pixel_array, [0.5, 99.5])
    plain.WindowCenter, plain.WindowWidth = (lo + hi) / 2, hi - lo
    plain_path = save(plain, tmp_path / "plain.dcm")
    bundle, x = model_input(engines, settings, case)
    _, ref = model_input(engines, settings, plain_path)
    assert bundle == "cxr-phantom"
    assert float(x.max()) > 0.99 and abs(float(x.mean()) - float(ref.mean())) < 0.03  # was near black
    got, want = findings(engines, settings, case), findings(engines, settings, plain_path)
    assert got["nodule"][1] and got["nodule"][0] > 0.3
    assert {k for k, (_, pos) in got.items() if pos} == {k for k, (_, pos) in want.items() if pos} == {"nodule"}
    assert abs(got["nodule"][0] - want["nodule"][0]) < 0.03


@pytest.mark.integration
def test_case_mg_monochrome2_presentation_inverse(reference, tmp_path: Path) -> None:
    """Right outcome: the model sees what the viewer shows (dense bright); the mass found exactly as in the
    control written conventionally (MONOCHROME2, IDENTITY)."""
    settings, engines = reference
    case = write_case("mg_monochrome2_presentation_inverse", tmp_path / "case.dcm")
    control = write_case("mg_monochrome2_presentation_inverse", tmp_path / "control.dcm", "control")
    bundle, x = model_input(engines, settings, case)
    _, ref = model_input(engines, settings, control)
    assert bundle == "mmg-phantom"
    assert np.abs(x - ref).max() < 2e-3  # the same picture up to the 14-bit rounding of each encoding
    got, want = findings(engines, settings, case), findings(engines, settings, control)
    assert got["mass"][1] and want["mass"][1]
    assert abs(got["mass"][0] - want["mass"][0]) < 1e-3
