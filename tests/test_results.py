"""preprocess -> tiny ONNX model (ONNX Runtime) -> postprocess -> SR + SC, checked against known truth."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, RLELossless

from appliance.pipeline.analyse import analyse
from appliance.pipeline.postprocess import contour, peak
from appliance.pipeline.preprocess import NotProcessable
from appliance.pipeline.results_sc import build_sc
from appliance.pipeline.results_sr import build_sr, read_sr_points
from testsupport.pipeline import TinyEngine, make_dataset, synthetic_image, tiny_manifest

ROWS, COLS = 900, 700
TRUTH = (300.0, 480.0)


@pytest.fixture(scope="module")
def engine() -> TinyEngine:
    return TinyEngine()


def _roundtrip(ds):
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


CASES = {
    "mono2": {},
    "mono1": {"photometric": "MONOCHROME1"},
    "nonsquare": {"spacing": (0.1, 0.2)},
    "j2k": {"transfer_syntax": JPEG2000Lossless},
    "rle": {"transfer_syntax": RLELossless},
}


@pytest.mark.parametrize("case", list(CASES))
def test_sr_location_matches_truth(engine: TinyEngine, case: str) -> None:
    kw = dict(CASES[case])
    img = synthetic_image(ROWS, COLS, TRUTH, radius=25)
    if kw.get("photometric") == "MONOCHROME1":
        img = (4095 - img).astype(np.uint16)  # dense = low stored value
    ds = _roundtrip(make_dataset(img, **kw))
    manifest = tiny_manifest()
    a = analyse([ds], manifest, engine.infer, engine.max_batch, 10**8)
    sr = _roundtrip(build_sr(a.result, a.sources, manifest.title))
    points = read_sr_points(sr)
    assert len(points) == 1 and points[0]["finding"] == "Nodule"
    assert points[0]["sop_uid"] == ds.SOPInstanceUID
    assert abs(points[0]["row"] - TRUTH[0]) <= 0.02 * ROWS
    assert abs(points[0]["col"] - TRUTH[1]) <= 0.02 * COLS
    assert sr.StudyInstanceUID == ds.StudyInstanceUID and sr.SeriesInstanceUID != ds.SeriesInstanceUID
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR


def test_negative_image_has_no_location(engine: TinyEngine) -> None:
    ds = make_dataset(synthetic_image(ROWS, COLS, None) + 100, window=(2048, 4096))
    a = analyse([ds], tiny_manifest(), engine.infer, 8, 10**8)
    f = a.result.images[0].findings[0]
    assert not f.positive and f.location is None
    assert read_sr_points(build_sr(a.result, a.sources, "t")) == []


def test_uids_are_deterministic_per_input_and_bundle_version(engine: TinyEngine) -> None:
    ds = make_dataset(synthetic_image(200, 200, (50, 60), radius=10))
    m = tiny_manifest()
    a1 = analyse([ds], m, engine.infer, 8, 10**8)
    a2 = analyse([ds], m, engine.infer, 8, 10**8)
    sr1, sr2 = build_sr(a1.result, a1.sources, "t"), build_sr(a2.result, a2.sources, "t")
    sc1 = build_sc(a1.result.images[0], ds, a1.prepared[0].display, a1.result, 0)
    sc2 = build_sc(a2.result.images[0], ds, a2.prepared[0].display, a2.result, 0)
    assert (sr1.SOPInstanceUID, sr1.SeriesInstanceUID) == (sr2.SOPInstanceUID, sr2.SeriesInstanceUID)
    assert sc1.SOPInstanceUID == sc2.SOPInstanceUID
    m2 = m.model_copy(update={"version": "1.0.1"})
    a3 = analyse([ds], m2, engine.infer, 8, 10**8)
    assert build_sr(a3.result, a3.sources, "t").SOPInstanceUID != sr1.SOPInstanceUID
    assert len({sr1.SOPInstanceUID, sc1.SOPInstanceUID, ds.SOPInstanceUID}) == 3


def test_sc_overlay_banner_and_text(engine: TinyEngine) -> None:
    ds = make_dataset(synthetic_image(1500, 1200, (400, 800), radius=40), spacing=(0.2, 0.2))
    a = analyse([ds], tiny_manifest(), engine.infer, 8, 10**8)
    prep = a.prepared[0]  # the display is reduced (1500 > 1024 rows): its factor maps it to original pixels
    sc = _roundtrip(build_sc(a.result.images[0], ds, prep.display, a.result, 0, 512, prep.display_factor))
    px = sc.pixel_array
    assert sc.PhotometricInterpretation == "RGB" and px.shape == (512, 410, 3)
    assert sc.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert sc.StudyInstanceUID == ds.StudyInstanceUID and sc.BurnedInAnnotation == "YES"
    assert "NOT FOR CLINICAL USE" in sc.SeriesDescription
    banner = px[:8].reshape(-1, 3).mean(axis=0)
    assert banner[0] > 150 and banner[1] < 60  # red banner on top
    # heatmap is coloured (not gray) around the nodule, gray far from it
    r, c = int(400 * 512 / 1500), int(800 * 410 / 1200)
    patch = px[r - 5 : r + 5, c - 5 : c + 5].astype(int)
    assert np.abs(patch[..., 0] - patch[..., 2]).mean() > 20
    corner = px[-50:, :50].astype(int)
    assert np.abs(corner[..., 0] - corner[..., 2]).max() == 0


def test_clinical_bundle_has_no_banner(engine: TinyEngine) -> None:
    ds = make_dataset(synthetic_image(300, 300, (100, 100), radius=10))
    m = tiny_manifest().model_copy(update={"clinical_use": True})
    a = analyse([ds], m, engine.infer, 8, 10**8)
    sc = build_sc(a.result.images[0], ds, a.prepared[0].display, a.result, 0)
    assert "NOT FOR CLINICAL USE" not in sc.SeriesDescription
    assert sc.pixel_array[:4].reshape(-1, 3)[:, 0].mean() < 150


def test_mammogram_per_breast_score_on_the_correct_side(engine: TinyEngine) -> None:
    study = pydicom.uid.generate_uid()
    views = []
    for side in ("L", "R"):
        for view in ("CC", "MLO"):
            lesion = (200, 150) if (side, view) in {("R", "CC"), ("R", "MLO")} else None
            img = synthetic_image(600, 480, lesion, radius=15)
            views.append(make_dataset(img, modality="MG", laterality=side, view=view, study_uid=study))
    m = tiny_manifest(task="mmg", label="lesion", modalities=("MG",))
    a = analyse(views, m, engine.infer, 2, 10**8)  # max_batch 2 -> two batches
    assert engine.calls >= 2
    pb = a.result.per_breast
    assert set(pb) == {"L", "R"} and pb["R"] > pb["L"] + 0.2
    assert a.result.study_score == pytest.approx(pb["R"])
    summary = a.result.summary()
    assert summary["per_breast"]["R"] == pytest.approx(pb["R"], abs=1e-6)
    assert {f["laterality"] for f in summary["findings"] if f["positive"]} == {"R"}
    assert summary["patient"]["PatientID"] == "P123"


def test_study_with_only_unusable_images_is_not_processable(engine: TinyEngine) -> None:
    rgb = pydicom.dcmread(get_testdata_file("SC_rgb_rle.dcm", download=False))
    tiny = make_dataset(np.ones((1, 1), dtype=np.uint16))
    with pytest.raises(NotProcessable) as exc:
        analyse([rgb, tiny], tiny_manifest(), engine.infer, 8, 10**8)
    assert "colour image" in exc.value.reason and "too small" in exc.value.reason


def test_unusable_image_is_skipped_next_to_good_ones(engine: TinyEngine) -> None:
    good = make_dataset(synthetic_image(300, 300, (100, 100), radius=10))
    tiny = make_dataset(np.ones((1, 1), dtype=np.uint16), study_uid=good.StudyInstanceUID)
    a = analyse([good, tiny], tiny_manifest(), engine.infer, 8, 10**8)
    assert [i.sop_instance_uid for i in a.result.images] == [good.SOPInstanceUID]
    assert a.skipped and a.skipped[0][0] == tiny.SOPInstanceUID


def test_peak_subcell_and_contour_radius() -> None:
    rr, cc = np.mgrid[0:32, 0:32]
    hm = np.exp(-((rr - 10.3) ** 2 + (cc - 20.6) ** 2) / (2 * 3.0**2))
    r, c, v = peak(hm)
    assert abs(r - 10.3) < 0.2 and abs(c - 20.6) < 0.2 and v > 0.9
    poly = contour(hm, r, c, fraction=0.5)
    radii = np.hypot(poly[:, 0] - 10.3, poly[:, 1] - 20.6)
    # half-maximum radius of a Gaussian: sigma * sqrt(2 ln 2)
    assert np.allclose(radii, 3.0 * np.sqrt(2 * np.log(2)), atol=0.3)


def _sr_bytes(sr) -> bytes:
    for kw in ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime"):
        if kw in sr:
            delattr(sr, kw)
    for item in sr.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            del item.ContributionDateTime
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_fast_sr_equals_highdicoms_full_path(engine: TinyEngine) -> None:
    """The SR built without highdicom's deep copy is the same document as highdicom's own path."""
    study = pydicom.uid.generate_uid()
    views = [
        make_dataset(
            synthetic_image(600, 480, (200, 150) if side == "R" else None, radius=15),
            modality="MG",
            laterality=side,
            view=view,
            study_uid=study,
        )
        for side in ("L", "R")
        for view in ("CC", "MLO")
    ]
    m = tiny_manifest(task="mmg", label="lesion", modalities=("MG",))
    a = analyse(views, m, engine.infer, 4, 10**8)
    assert any(f.location is not None for img in a.result.images for f in img.findings)
    fast, full = build_sr(a.result, a.sources, m.title), build_sr(a.result, a.sources, m.title, full_copy=True)
    evidence = fast.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert {r.ReferencedSOPInstanceUID for s in evidence for r in s.ReferencedSOPSequence} == {
        v.SOPInstanceUID for v in views
    }
    assert _sr_bytes(fast) == _sr_bytes(full)
    assert len(fast.content[0].ContentSequence) == len(full.content[0].ContentSequence)
    assert read_sr_points(fast) == read_sr_points(full) != []
