"""Transfer-syntax invariance: one radiograph in every lossless syntax the box accepts gives the same decoded
pixels, the same model input byte for byte, the same scores and the same SC overlay; lossy encodings stay within
the stated tolerance.

Encoders are real and independent of the decoders where possible: dcmtk (``dcmconv`` for implicit / big endian /
deflate, ``dcmcrle``, ``dcmcjpeg`` for JPEG lossless, ``dcmcjpls`` for JPEG-LS) and pydicom's encoders
(pylibjpeg-openjpeg for JPEG 2000, pyjpegls, RLE). Decoding is pydicom's (GDCM, pylibjpeg, pyjpegls).
The reference models are the REAL reference bundles on ONNX Runtime.

Not covered: HTJ2K (accepted, and decodable by pylibjpeg-openjpeg, but no encoder is installed to write one).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGLSLossless, RLELossless

from appliance.app.infer_offline import run_offline
from appliance.pipeline.preprocess import prepare
from engines.reference.phantoms import PatientInfo, chest_phantom, to_dicom, write_dicom
from testsupport.reference import findings, model_input, reference_engines

# Lossy encodings: the tolerance stated for them (JPEG 2000 irreversible at 10:1, JPEG-LS NEAR=2 on 12 bits).
LOSSY_SCORE_ATOL = 0.02  # every score within 0.02 of the lossless one, the same findings positive
LOSSY_INPUT_MEAN_ATOL = 0.005  # mean absolute difference of the model input (intensities in [0, 1])

SIZE = (1400, 1150)  # bigger than the SC / display long side (1024): the reduced display is exercised too

pytestmark = pytest.mark.integration  # dcmtk encoders and the shipped reference models


def _dcmtk(tool: str, *args: str) -> None:
    subprocess.run([tool, *args], check=True, capture_output=True)


def _pydicom(src: Path, out: Path, syntax: str, **kwargs) -> None:
    ds = pydicom.dcmread(src)
    ds.compress(syntax, generate_instance_uid=False, **kwargs)
    ds.save_as(out, enforce_file_format=True)


ENCODERS = {  # name -> (transfer syntax UID, how to write it from the explicit VR little endian file)
    "implicit-le": ("1.2.840.10008.1.2", lambda s, o: _dcmtk("dcmconv", "+ti", str(s), str(o))),
    "explicit-be": ("1.2.840.10008.1.2.2", lambda s, o: _dcmtk("dcmconv", "+tb", str(s), str(o))),
    "deflate": ("1.2.840.10008.1.2.1.99", lambda s, o: _dcmtk("dcmconv", "+td", str(s), str(o))),
    "rle-dcmtk": ("1.2.840.10008.1.2.5", lambda s, o: _dcmtk("dcmcrle", str(s), str(o))),
    "rle-pydicom": (RLELossless, lambda s, o: _pydicom(s, o, RLELossless)),
    "jpeg-lossless-sv1": ("1.2.840.10008.1.2.4.70", lambda s, o: _dcmtk("dcmcjpeg", "+e1", str(s), str(o))),
    "jpeg-lossless-p14": ("1.2.840.10008.1.2.4.57", lambda s, o: _dcmtk("dcmcjpeg", "+el", str(s), str(o))),
    "jpeg-ls-dcmtk": ("1.2.840.10008.1.2.4.80", lambda s, o: _dcmtk("dcmcjpls", "+el", str(s), str(o))),
    "jpeg-ls-pyjpegls": (JPEGLSLossless, lambda s, o: _pydicom(s, o, JPEGLSLossless)),
    "j2k-lossless": (JPEG2000Lossless, lambda s, o: _pydicom(s, o, JPEG2000Lossless)),
}
LOSSY = {
    "j2k-10to1": (JPEG2000, lambda s, o: _pydicom(s, o, JPEG2000, j2k_cr=[10])),
    "jpeg-ls-near2": ("1.2.840.10008.1.2.4.81", lambda s, o: _dcmtk("dcmcjpls", "+en", str(s), str(o))),
}


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory):
    """The reference models, and the radiograph written uncompressed (Explicit VR Little Endian)."""
    tmp = tmp_path_factory.mktemp("ts")
    settings, engines = reference_engines(tmp / "home")
    ph = chest_phantom(*SIZE, seed=7, nodules=1)
    patient = PatientInfo(name="TS^INVARIANCE", patient_id="TS1")
    ds = to_dicom(ph.pixels, modality="DX", photometric="MONOCHROME1", pixel_spacing=(0.15, 0.15), patient=patient,
                  patient_orientation=("L", "F"))  # fmt: skip
    src = write_dicom(ds, tmp / "explicit-le.dcm")
    yield settings, engines, src, tmp
    engines.close()


def _encode(box, name: str, table: dict) -> Path:
    _, _, src, tmp = box
    syntax, write = table[name]
    out = tmp / f"{name}.dcm"
    if not out.exists():
        write(src, out)
    assert str(pydicom.dcmread(out, stop_before_pixels=True).file_meta.TransferSyntaxUID) == syntax
    return out


def _sc_pixels(settings, engines, path: Path, out: Path) -> np.ndarray:
    report = run_offline(settings, [path], out, bundles=engines)
    (sc,) = [o for o in report["studies"][0]["results"][0]["objects"] if o["kind"] == "SC"]
    return pydicom.dcmread(sc["path"]).pixel_array


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_every_lossless_syntax_gives_the_same_model_input_scores_and_overlay(box, name: str) -> None:
    settings, engines, src, tmp = box
    path = _encode(box, name, ENCODERS)
    ref_ds, ds = pydicom.dcmread(src), pydicom.dcmread(path)
    np.testing.assert_array_equal(ds.pixel_array, ref_ds.pixel_array)  # the decoders are lossless
    bundle, x = model_input(engines, settings, path)
    _, ref = model_input(engines, settings, src)
    assert bundle == "cxr-phantom" and x.dtype == ref.dtype and x.tobytes() == ref.tobytes()
    spec = next(m for m, _ in engines.active() if m.bundle_id == bundle).input.preprocessing
    p, q = prepare(ds, spec, 10**9), prepare(ref_ds, spec, 10**9)
    assert p.display.tobytes() == q.display.tobytes() and p.transform == q.transform
    assert p.display_factor == q.display_factor == max(SIZE) / 1024
    assert findings(engines, settings, path) == findings(engines, settings, src)  # scores equal, not close
    sc, ref_sc = (
        _sc_pixels(settings, engines, path, tmp / f"out-{name}"),
        _sc_pixels(settings, engines, src, tmp / "out-ref"),
    )
    assert sc.shape == ref_sc.shape and max(sc.shape[:2]) == 1024
    np.testing.assert_array_equal(sc, ref_sc)


@pytest.mark.parametrize("name", sorted(LOSSY))
def test_lossy_syntaxes_stay_within_the_stated_tolerance(box, name: str) -> None:
    settings, engines, src, _ = box
    path = _encode(box, name, LOSSY)
    _, x = model_input(engines, settings, path)
    _, ref = model_input(engines, settings, src)
    assert x.tobytes() != ref.tobytes()  # it is lossy
    assert float(np.abs(x - ref).mean()) <= LOSSY_INPUT_MEAN_ATOL
    got, want = findings(engines, settings, path), findings(engines, settings, src)
    assert got.keys() == want.keys()
    for label, (score, positive) in want.items():
        assert abs(got[label][0] - score) <= LOSSY_SCORE_ATOL, (label, got[label][0], score)
        assert got[label][1] == positive
