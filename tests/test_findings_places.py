"""Issue 19 item 1 (+ SC text of item 2): a finding at several places is marked at each (the REAL reference cxr
model on phantoms with two nodules / a bilateral effusion), each place with the patient side it lies on; the
findings read per side; the SC banner never joins words and its text is legible at the smallest SC size."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw

from appliance.app.infer_offline import run_offline
from appliance.pipeline.analyse import analyse
from appliance.pipeline.postprocess import patient_side, peaks, reading
from appliance.pipeline.results_sc import (
    BANNER,
    MIN_CAP_HEIGHT_PX,
    MIN_FONT_PX,
    _font,
    banner_lines,
    render_overlay,
)
from appliance.pipeline.results_sr import build_sr, read_sr_points
from appliance.worklist.display import finding_text
from engines.reference import phantoms as P
from testsupport.pipeline import TinyEngine, tiny_manifest
from testsupport.reference import reference_engines


def test_peaks_finds_two_separate_blobs_and_not_a_bump_on_one() -> None:
    r, c = np.mgrid[0:40, 0:40]
    two = np.exp(-((r - 10) ** 2 + (c - 8) ** 2) / 8.0) + 0.8 * np.exp(-((r - 30) ** 2 + (c - 32) ** 2) / 8.0)
    got = peaks(two)
    assert len(got) == 2
    assert abs(got[0][0] - 10) < 0.5 and abs(got[0][1] - 8) < 0.5
    assert abs(got[1][0] - 30) < 0.5 and abs(got[1][1] - 32) < 0.5
    one = np.exp(-((r - 20) ** 2 + (c - 20) ** 2) / 200.0) + 0.05 * np.exp(-((r - 26) ** 2 + (c - 20) ** 2) / 2.0)
    assert len(peaks(one)) == 1  # a bump on the same region is no second place
    weak = two.copy() + 0.3 * np.exp(-((r - 30) ** 2 + (c - 5) ** 2) / 4.0)
    assert len(peaks(weak)) == 2  # 0.3 < PEAK_RELATIVE_HEIGHT of the highest peak


def test_patient_side_from_patient_orientation() -> None:
    # PA chest L\F: increasing column runs to the patient's left
    assert patient_side(10, 200, (320, 256), ("L", "F")) == "L"
    assert patient_side(10, 20, (320, 256), ("L", "F")) == "R"
    # AP-like flip R\F, and a grid rotated 90 degrees (rows run to the patient's left: down = L)
    assert patient_side(10, 200, (320, 256), ("R", "F")) == "R"
    assert patient_side(300, 10, (320, 256), ("H", "L")) == "L"
    assert patient_side(10, 200, (320, 256), ("A", "F")) is None  # a lateral view has no left/right axis
    assert patient_side(10, 200, (320, 256), None) is None


def test_reading_per_breast_with_supporting_views() -> None:
    entries = [
        {"label": "mass", "score": 0.46, "positive": True, "urgent": False, "laterality": "L", "view": "CC",
         "side": "L", "places": 1},
        {"label": "mass", "score": 0.41, "positive": True, "urgent": False, "laterality": "L", "view": "MLO",
         "side": "L", "places": 1},
        {"label": "mass", "score": 0.08, "positive": False, "urgent": False, "laterality": "R", "view": "CC",
         "side": "R", "places": 0},
        {"label": "mass", "score": 0.11, "positive": False, "urgent": False, "laterality": "R", "view": "MLO",
         "side": "R", "places": 0},
    ]  # fmt: skip
    left, right = reading(entries)
    assert finding_text(left, mammo=True) == "L breast: mass 0.46 (CC, MLO)"
    assert finding_text(right, mammo=True) == "R breast: mass 0.11 (MLO)"  # the view with the breast's score
    assert not right["positive"]


def test_banner_wraps_between_words_and_never_joins_them() -> None:
    font = _font(MIN_FONT_PX)
    for width in (40, 80, 120, 160, 200, 1000):
        lines = banner_lines(font, BANNER, width)
        assert " ".join(lines) == BANNER
        assert all(w in BANNER.split() for line in lines for w in line.split())
        assert [w for line in lines for w in line.split()] == BANNER.split()


def test_text_at_min_size_has_legible_capitals_and_visible_word_gaps() -> None:
    """Measured from pixels: the banner drawn at the smallest size has capitals >= MIN_CAP_HEIGHT_PX tall and
    four ink runs (words) separated by blank columns."""
    font = _font(MIN_FONT_PX)
    im = Image.new("L", (400, 60), 0)
    ImageDraw.Draw(im).text((10, 10), BANNER, fill=255, font=font)
    ink = np.asarray(im) > 128
    rows = np.nonzero(ink.any(axis=1))[0]
    assert rows.max() - rows.min() + 1 >= MIN_CAP_HEIGHT_PX  # capitals only: the cap height
    cols = ink.any(axis=0).astype(int)
    gaps = [len(g) for g in "".join(map(str, cols)).strip("0").split("1") if g]
    assert len(gaps) >= 3 and sorted(gaps)[-3] >= 4, gaps  # three word spaces, each at least 4 blank columns


@pytest.mark.parametrize("size", [(160, 160), (320, 256)])
def test_smallest_sc_text_is_at_least_min_size(tmp_path: Path, size) -> None:
    engine = TinyEngine()
    st = P.chest_study(tmp_path, seed=2, size=size)
    ds = pydicom.dcmread(st["files"][0])
    a = analyse([ds], tiny_manifest(), engine.infer, 8, 10**8)
    img, prep = a.result.images[0], a.prepared[0]
    px, boxes = render_overlay(img, prep.display, (0.15, 0.15), a.result, 1024, prep.display_factor, "PA")
    assert boxes and all(b.font_px >= MIN_FONT_PX for b in boxes)
    (banner,) = [b for b in boxes if b.kind == "banner"]
    assert " ".join(banner.lines) == BANNER and banner.box[2] <= px.shape[1]


@pytest.mark.integration
def test_reference_model_marks_each_place_and_the_sr_keeps_a_region_each(tmp_path: Path) -> None:
    settings, engines = reference_engines(tmp_path / "home")
    try:
        cases = {
            "effusion": P.chest_study(tmp_path / "eff", seed=3, nodules=0, effusion="both"),
            "nodule": P.chest_study(tmp_path / "nod", seed=3, nodules=[(0.3, 0.4, 0.03), (0.72, 0.55, 0.03)]),
        }
        for label, st in cases.items():
            truth = st["truth"][0]
            rep = run_offline(settings, [Path(f) for f in st["files"]], None, bundles=engines)
            (study,) = rep["studies"]
            (res,) = study["results"]
            f = next(x for x in res["findings"] if x["label"] == label)
            assert f["positive"] and len(f["locations"]) == 2, f
            if label == "nodule":  # each nodule's centre within 2 % of the image
                want = sorted((y, x) for x, y in (g["center_xy"] for g in truth["findings"]))
                got = sorted((p["row"], p["col"]) for p in f["locations"])
                for (wr, wc), (gr, gc) in zip(want, got, strict=True):
                    assert abs(wr - gr) <= 0.02 * truth["rows"] and abs(wc - gc) <= 0.02 * truth["columns"]
                # PA (L\\F): the nodule on the image's right is in the patient's left lung
                assert {p["side"] for p in f["locations"]} == {"L", "R"}
                assert all((p["side"] == "L") == (p["col"] > truth["columns"] / 2) for p in f["locations"])
            else:  # one place per lung, on the side the phantom put the fluid
                sides = {g["side"][0].upper() for g in truth["findings"] if g["kind"] == "effusion"}
                assert {p["side"] for p in f["locations"]} == sides == {"L", "R"}
            assert {r["side"] for r in res["reading"] if r["label"] == label} == {"L", "R"}
        # the SR: one peak region per place, valid
        st = cases["effusion"]
        ds = pydicom.dcmread(st["files"][0])
        (m, engine) = next((m, e) for m, e in engines.active() if m.task == "cxr")
        a = analyse([ds], m, engine.infer, 8, 10**8)
        sr = build_sr(a.result, a.sources, m.title)
        points = [p for p in read_sr_points(sr) if "ffusion" in p["finding"]]
        assert len(points) == 2, read_sr_points(sr)
        out = tmp_path / "sr.dcm"
        sr.save_as(out, enforce_file_format=True)
        checked = subprocess.run(["dciodvfy", str(out)], capture_output=True, text=True, timeout=60)
        assert not [ln for ln in (checked.stdout + checked.stderr).splitlines() if ln.startswith("Error")]
    finally:
        engines.close()


@pytest.mark.integration
def test_reference_mammography_model_reads_the_mass_on_its_breast_with_both_views(tmp_path: Path) -> None:
    """The phantom puts one mass in the left breast (both views): the reading says so, views CC and MLO."""
    settings, engines = reference_engines(tmp_path / "home")
    try:
        st = P.mammo_study(tmp_path / "mg", seed=5, masses={"L": 1})
        rep = run_offline(settings, [Path(f) for f in st["files"]], None, bundles=engines)
        (study,) = rep["studies"]
        (res,) = study["results"]
        first = res["reading"][0]
        assert (first["label"], first["side"], first["positive"], first["views"]) == ("mass", "L", True, ["CC", "MLO"])
        assert finding_text(first, mammo=True) == f"L breast: mass {first['score']:.2f} (CC, MLO)"
        right = next(r for r in res["reading"] if r["side"] == "R")
        assert not right["positive"]
        for f in res["findings"]:  # every finding names its breast: the image's laterality
            assert f["side"] == next(
                t["laterality"] for t in st["truth"] if t["sop_instance_uid"] == f["image_sop_uid"]
            )
    finally:
        engines.close()
