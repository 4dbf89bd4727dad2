"""Issue 16 item 3 with the REAL reference cxr model (ONNX Runtime) on phantoms with known truth: Pixel Padding
Value / Range Limit (PS3.3 C.7.5.1.1.2), Patient Orientation (C.7.6.1.1.1) and Pixel Aspect Ratio
(C.7.6.3.1.7). Each case is compared with the same physical image written plainly (no padding, upright, square
pixels), and a control shows what the old behaviour gave, so a wrong answer is distinguishable.

The reference bundles 1.0.1 declared no orientation, 1.0.2 does; the orientation cases give the model a manifest
that does (``{"*": rows L, columns F}``, as 1.0.2), through the offline pipeline (``run_offline``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from appliance.app.infer_offline import run_offline
from appliance.pipeline.worker import StaticBundles
from engines.manifest import Manifest, Orientation
from engines.reference import phantoms as P
from testsupport.phantoms import anisotropic_chest
from testsupport.reference import findings, model_input, reference_engines, write_case

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
CHEST = {"*": Orientation(rows=["L"], columns=["F"])}
STRIP = 10  # columns of padding each side: air in the phantom (the torso spans 4..96 % of the width)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    settings, engines = reference_engines(tmp_path_factory.mktemp("home"))
    yield settings, engines
    engines.close()


def _nodule_truth(ph: P.Phantom) -> tuple[float, float]:
    (x, y) = next(f["center_xy"] for f in ph.truth["findings"] if f["kind"] == "nodule")
    return float(y), float(x)  # (row, col)


def _report(settings, bundles, path: Path) -> dict[str, Any]:
    report = run_offline(settings, [path], None, bundles=bundles)
    assert not report["errors"], report["errors"]
    (study,) = report["studies"]
    (result,) = study["results"]
    return result


def _scores(result: dict[str, Any]) -> dict[str, tuple[float, bool]]:
    return {f["label"]: (f["score"], f["positive"]) for f in result["findings"]}


def _nodule_at(result: dict[str, Any]) -> tuple[float, float]:
    f = next(f for f in result["findings"] if f["label"] == "nodule")
    assert f["positive"] and f["location"], f
    return f["location"]["row"], f["location"]["col"]


# ---- Pixel Padding Value / Range Limit: a MONOCHROME1 CR with no window ---------------------------------------


def _mono1_cr(tmp: Path, name: str, padding: str | None) -> tuple[Path, P.Phantom]:
    """The field case's chest as a MONOCHROME1 CR without a window (the min-max fall-back decides), 16 bits
    stored, the image in 0..4095; ``padding``: None, "value" (65535), "range" (65535 down to 60000), "signed"
    (-32768) or "signed-range" (-30000 down to -32768), over side strips that are air in the phantom."""
    ph = P.chest_phantom(320, 256, seed=1, nodules=1)
    strips = np.concatenate([ph.pixels[:, :STRIP], ph.pixels[:, -STRIP:]], axis=1)
    assert float(np.percentile(strips, 90)) < 0.15  # air there (the torso's edge grazes them at the bottom)
    ds = P.to_dicom(ph.pixels, modality="CR", photometric="MONOCHROME1", patient_orientation=("L", "F"))
    del ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction
    ds.BitsStored, ds.HighBit = 16, 15
    arr = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(ds.Rows, ds.Columns).astype(np.int32)
    side = np.zeros(arr.shape, bool)
    side[:, :STRIP] = side[:, -STRIP:] = True
    rng = np.random.default_rng(5)
    if padding in ("value", "range"):
        ds.PixelPaddingValue = 65535
        arr[side] = 65535 if padding == "value" else rng.integers(60000, 65536, int(side.sum()))
        if padding == "range":
            ds.PixelPaddingRangeLimit = 60000
    elif padding in ("signed", "signed-range"):
        ds.PixelRepresentation = 1
        ds.add_new(0x00280120, "SS", -30000 if padding == "signed-range" else -32768)
        arr[side] = -32768 if padding == "signed" else rng.integers(-32768, -29999, int(side.sum()))
        if padding == "signed-range":
            ds.add_new(0x00280121, "SS", -32768)
    dtype = np.int16 if padding and padding.startswith("signed") else np.uint16
    ds.PixelData = arr.astype(dtype).tobytes()
    return P.write_dicom(ds, tmp / f"{name}.dcm"), ph


@pytest.mark.parametrize("padding", ["value", "range", "signed", "signed-range"])
def test_padded_monochrome1_cr_finds_the_nodule_as_the_unpadded_image(reference, tmp_path: Path, padding) -> None:
    settings, engines = reference
    case, ph = _mono1_cr(tmp_path, "case", padding)
    plain, _ = _mono1_cr(tmp_path, "plain", None)
    _, x = model_input(engines, settings, case)
    _, ref = model_input(engines, settings, plain)
    np.testing.assert_allclose(x[0][:, :STRIP], 0.0)  # the padding is the model's background
    got, want = findings(engines, settings, case), findings(engines, settings, plain)
    assert {k for k, (_, pos) in want.items() if pos} == {"nodule"}
    assert {k for k, (_, pos) in got.items() if pos} == {"nodule"}  # found, and no false positive
    for label, (score, _) in want.items():
        assert abs(got[label][0] - score) < 0.05, (label, got, want)
    result = _report(settings, engines, case)
    row, col = _nodule_at(result)
    tr, tc = _nodule_truth(ph)
    assert abs(row - tr) < 0.02 * 320 and abs(col - tc) < 0.02 * 256
    # control: the same file read as if it declared no padding (the old behaviour) is a different picture
    ds = pydicom.dcmread(case)
    del ds.PixelPaddingValue
    if "PixelPaddingRangeLimit" in ds:
        del ds.PixelPaddingRangeLimit
    bare = P.write_dicom(ds, tmp_path / "bare.dcm")
    _, old = model_input(engines, settings, bare)
    assert float(np.abs(old - ref).mean()) > 0.2 > float(np.abs(x - ref).mean())


def test_padded_cr_through_appliance_infer(tmp_path: Path) -> None:
    """The CLI (``appliance infer --json``) on the padded MONOCHROME1 CR: the nodule, no false positive."""
    case, ph = _mono1_cr(tmp_path, "case", "range")
    out = subprocess.run(
        [sys.executable, "-m", "appliance", "--home", str(tmp_path / "home"), "infer", str(case), "--json"],
        cwd=ROOT,
        env={
            "PYTHONPATH": str(ROOT),
            "PATH": "/usr/bin:/bin",
            "APPLIANCE_ENGINES__TRUST_DEMO_KEY": "true",
            "APPLIANCE_ENGINES__INSTALL_REFERENCE_BUNDLES": "true",
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    (study,) = json.loads(out.stdout)["studies"]
    (result,) = study["results"]
    assert result["bundle_id"] == "cxr-phantom"
    assert {f["label"] for f in result["findings"] if f["positive"]} == {"nodule"}
    row, col = _nodule_at(result)
    tr, tc = _nodule_truth(ph)
    assert abs(row - tr) < 0.02 * 320 and abs(col - tc) < 0.02 * 256


# ---- Patient Orientation ----------------------------------------------------------------------------------


def _oriented(engines, orientation: Any = CHEST) -> StaticBundles:
    """The active reference bundles, the cxr one with ``orientation`` declared (1.0.2 declares ``CHEST``; None:
    as the 1.0.1 bundles, which declared none)."""
    out: list[tuple[Manifest, Any]] = []
    for m, e in engines.active():
        if m.bundle_id == "cxr-phantom":
            pre = m.input.preprocessing.model_copy(update={"orientation": orientation})
            m = m.model_copy(update={"inputs": [m.input.model_copy(update={"preprocessing": pre})]})
        out.append((m, e))
    return StaticBundles(out)


@pytest.mark.parametrize(
    ("po", "op", "to_stored"),
    [
        # stored rotated 90 degrees clockwise: rows run toward the Head, columns toward patient Left
        (("H", "L"), lambda a: np.rot90(a, -1), lambda r, c, h, w: (c, h - 1 - r)),
        (("R", "F"), np.fliplr, lambda r, c, h, w: (r, w - 1 - c)),  # flipped left-right
    ],
)
def test_rotated_or_flipped_cr_scores_as_upright_and_maps_back_to_the_stored_grid(
    reference, tmp_path: Path, po, op, to_stored
) -> None:
    settings, engines = reference
    bundles = _oriented(engines)
    ph = P.chest_phantom(320, 256, seed=1, nodules=1)
    upright = P.write_dicom(P.to_dicom(ph.pixels, modality="CR", patient_orientation=("L", "F")), tmp_path / "u.dcm")
    stored = P.to_dicom(np.ascontiguousarray(op(ph.pixels)), modality="CR", patient_orientation=po)
    case = P.write_dicom(stored, tmp_path / "case.dcm")
    want, got = _report(settings, bundles, upright), _report(settings, bundles, case)
    for label, (score, positive) in _scores(want).items():
        assert abs(_scores(got)[label][0] - score) < 1e-4 and _scores(got)[label][1] == positive
    tr, tc = _nodule_truth(ph)
    sr, sc = to_stored(tr, tc, 320, 256)
    row, col = _nodule_at(got)
    assert abs(row - sr) < 0.02 * 320 and abs(col - sc) < 0.02 * 320, ((row, col), (sr, sc))
    urow, ucol = _nodule_at(want)
    assert (row, col) == pytest.approx(to_stored(urow, ucol, 320, 256), abs=1e-6)  # the same point, stored grid
    # control: the manifest without orientation (1.0.1) sees the stored picture: another model input
    old = _report(settings, _oriented(engines, None), case)
    assert any(abs(_scores(old)[k][0] - s) > 1e-3 for k, (s, _) in _scores(want).items())


def test_cr_without_patient_orientation_is_analysed_as_stored_with_an_orientation_manifest(
    reference, tmp_path: Path
) -> None:
    """The field case keeps its right outcome once the bundle declares an orientation (absent = as stored)."""
    settings, engines = reference
    bundles = _oriented(engines)
    for variant in ((), ("empty",)):
        case = write_case("cr_without_patient_orientation", tmp_path / f"case{len(variant)}.dcm", *variant)
        result = _report(settings, bundles, case)
        assert {f["label"] for f in result["findings"] if f["positive"]} == {"nodule"}


def test_lateral_orientation_is_refused_with_its_reason(reference, tmp_path: Path) -> None:
    settings, engines = reference
    ph = P.chest_phantom(320, 256, seed=1, nodules=1)
    case = P.write_dicom(P.to_dicom(ph.pixels, modality="CR", patient_orientation=("A", "F")), tmp_path / "c.dcm")
    report = run_offline(settings, [case], None, bundles=_oriented(engines))
    (study,) = report["studies"]
    text = json.dumps(study)
    assert "Patient Orientation A\\\\F cannot be brought" in text, text
    assert not any(f.get("positive") for r in study.get("results", []) for f in r.get("findings", []))


# ---- Pixel Aspect Ratio -----------------------------------------------------------------------------------


def test_non_square_pixels_given_only_by_pixel_aspect_ratio(reference, tmp_path: Path) -> None:
    """The physical chest is the same: spacing (0.12, 0.16) mm, or only Pixel Aspect Ratio 3\\4, give the same
    model input; the square-pixel image of the same chest gives the same findings."""
    settings, engines = reference
    study = anisotropic_chest(tmp_path, seed=1, rows=320, cols=240, spacing=(0.12, 0.16))
    with_spacing = Path(study["files"][0])
    ds = pydicom.dcmread(with_spacing)
    del ds.PixelSpacing, ds.ImagerPixelSpacing
    ds.PixelAspectRatio = [3, 4]
    par = P.write_dicom(ds, tmp_path / "par.dcm")
    ph = P.chest_phantom(320, 320, seed=1, nodules=1)  # the same chest drawn on square pixels
    square = P.write_dicom(P.to_dicom(ph.pixels, pixel_spacing=(0.12, 0.12)), tmp_path / "square.dcm")
    _, x = model_input(engines, settings, par)
    _, x_spacing = model_input(engines, settings, with_spacing)
    np.testing.assert_allclose(x, x_spacing, atol=1e-6)
    got, want = findings(engines, settings, par), findings(engines, settings, square)
    assert {k for k, (_, pos) in got.items() if pos} == {k for k, (_, pos) in want.items() if pos} == {"nodule"}
    for label, (score, _) in want.items():
        assert abs(got[label][0] - score) < 0.05, (label, got, want)
    row, col = _nodule_at(_report(settings, engines, par))
    (x0, y0) = next(f["center_xy"] for f in study["truth"][0]["findings"] if f["kind"] == "nodule")
    assert abs(row - y0) < 0.02 * 320 and abs(col - x0) < 0.02 * 320
    del ds.PixelAspectRatio  # control: read as square pixels, the chest is squeezed
    _, squeezed = model_input(engines, settings, P.write_dicom(ds, tmp_path / "sq.dcm"))
    assert float(np.abs(squeezed - x).mean()) > 0.02
