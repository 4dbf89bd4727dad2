"""Overlays a radiographer can read (issue 10, item 6) and the SR's procedure title from the study.

SCs are rendered from the phantom studies of ``engines.reference.phantoms``. OCR is not available, so text is
checked by geometry: :func:`render_overlay` returns the boxes it drew, and the pixels inside each box must be
an opaque dark backing with near-white text strokes whose contrast is at least 4.5:1 (WCAG 2.x, level AA),
different from the image underneath. The fast tests use the tiny test model with findings set by hand at the
phantoms' known truth; the last test runs the shipped reference models end to end (``integration``).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from appliance.pipeline import uids
from appliance.pipeline.analyse import Analysis, analyse
from appliance.pipeline.postprocess import Finding, ImageResult, Location, StudyResult
from appliance.pipeline.preprocess import pixel_spacing
from appliance.pipeline.results_sc import (
    MIN_FONT_PX,
    TextBox,
    build_sc,
    image_caption,
    render_overlay,
    summary_line,
)
from appliance.pipeline.results_sr import build_sr, procedure_reported
from engines.reference.phantoms import chest_study, mammo_study
from testsupport.pipeline import TinyEngine, tiny_manifest

CHEST_SIZE = (1400, 1150)  # larger than the SC's 1024: the display is reduced (factor 2) then resampled
MAMMO_SIZE = (1300, 1000)
AA_CONTRAST = 4.5  # WCAG 2.x minimum contrast ratio for normal text


@pytest.fixture(scope="module")
def engine() -> TinyEngine:
    return TinyEngine()


def _roundtrip(ds: Dataset) -> Dataset:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def _luminance(rgb: np.ndarray) -> float:
    """WCAG 2.x relative luminance of an sRGB colour (0..255)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return float(lin @ np.array([0.2126, 0.7152, 0.0722]))


def _contrast(a: np.ndarray, b: np.ndarray) -> float:
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def _region(px: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return px[y0:y1, x0:x1].reshape(-1, 3).astype(np.int64)


def _assert_legible(px: np.ndarray, box: TextBox) -> None:
    """The box holds its backing colour and text strokes of the text colour, at >= 4.5:1 contrast."""
    pixels = _region(px, box.box)
    assert len(pixels), box
    backing = (np.abs(pixels - np.array(box.bg)).max(axis=1) <= 8).mean()
    strokes = (np.abs(pixels - np.array(box.fg)).max(axis=1) <= 8).sum()
    assert backing > 0.5, (box.kind, box.text, backing)  # opaque backing, not the tissue underneath
    assert strokes >= 10 * len(box.lines), (box.kind, box.text, strokes)  # the text was drawn in its colour
    # the colours actually rendered: the most common (backing) and the brightest strokes (text)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    bg = colours[np.argmax(counts)]
    fg = pixels[np.argsort(pixels.sum(axis=1))[-max(5, len(pixels) // 100) :]].mean(axis=0)
    assert _contrast(fg, bg) >= AA_CONTRAST, (box.kind, box.text, fg, bg)


def _inside(box: tuple[int, int, int, int], shape: tuple[int, ...]) -> bool:
    x0, y0, x1, y1 = box
    return 0 <= x0 < x1 <= shape[1] and 0 <= y0 < y1 <= shape[0]


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def _circle(row: float, col: float, radius: float) -> Location:
    t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    return Location(row, col, [(row + radius * np.sin(a), col + radius * np.cos(a)) for a in t], 0.9)


def _chest(tmp: Path, engine: TinyEngine, seed: int = 4, **kw) -> tuple[Analysis, Dataset, dict]:
    study = chest_study(tmp, seed=seed, size=CHEST_SIZE, **kw)
    ds = pydicom.dcmread(study["files"][0])
    a = analyse([ds], tiny_manifest(), engine.infer, 8, 10**8)
    return a, ds, study["truth"][0]


def _chest_findings(truth: dict) -> list[Finding]:
    """The phantom's nodule (its true centre and radius) at 0.82 and an effusion at 0.61, both positive, and a
    negative cardiomegaly at 0.03: the example of the issue."""
    (nodule,) = [f for f in truth["findings"] if f["kind"] == "nodule"]
    (effusion,) = [f for f in truth["findings"] if f["kind"] == "effusion"]
    cx, cy = nodule["center_xy"]
    col = truth["columns"] * (0.75 if effusion["side"] == "left" else 0.25)  # PA: patient left on image right
    return [
        Finding("nodule", 0.82, 0.5, True, _circle(cy, cx, nodule["radius"])),
        Finding("effusion", 0.61, 0.5, True, _circle(effusion["level_y"] + 40, col, 60)),
        Finding("cardiomegaly", 0.03, 0.5, False),
    ]


def _render(a: Analysis, i: int = 0, caption: str = "", display: np.ndarray | None = None):
    img, src, prep = a.result.images[i], a.sources[i], a.prepared[i]
    shown = prep.display if display is None else display
    return render_overlay(img, shown, pixel_spacing(src), a.result, 1024, prep.display_factor, caption)


def test_each_positive_finding_has_a_legible_label_beside_its_marker(tmp_path: Path, engine: TinyEngine) -> None:
    a, ds, truth = _chest(tmp_path, engine, effusion="left")
    img = a.result.images[0]
    img.findings = _chest_findings(truth)
    img.heatmaps = {}
    px, boxes = _render(a, caption=image_caption(img, ds))
    findings, img.findings = img.findings, []
    bare, _ = _render(a)  # the same image without findings: what lies under the labels
    img.findings = findings
    labels = {b.finding: b for b in boxes if b.kind == "label"}
    assert set(labels) == {"nodule", "effusion"}  # every positive located finding, nothing for the negative
    assert labels["nodule"].text == "nodule 0.82" and labels["effusion"].text == "effusion 0.61"
    summary = next(b for b in boxes if b.kind == "summary")
    expected = "AI: nodule 0.82 (positive); effusion 0.61 (positive); cardiomegaly 0.03; NOT FOR CLINICAL USE"
    assert summary.text == expected
    assert next(b for b in boxes if b.kind == "caption").text == "PA"
    assert px.shape[0] == 1024 and labels["nodule"].font_px >= 1024 // 42  # scales with the SC, not 11 px
    for b in boxes:
        assert _inside(b.box, px.shape), b
        _assert_legible(px, b)
    for b in labels.values():
        others = [o.box for o in boxes if o is not b]
        assert all(_overlap(b.box, o) == 0 for o in others), b
        assert np.abs(_region(px, b.box) - _region(bare, b.box)).mean() > 20  # drawn, not the image
    # each label sits beside its own marker: the nearest label to the marker's peak (SC pixels)
    k = px.shape[0] / ds.Rows
    for f in img.findings:
        if not f.positive:
            continue
        x, y = f.location.col * k, f.location.row * k
        dist = {
            name: np.hypot(max(b.box[0] - x, 0, x - b.box[2]), max(b.box[1] - y, 0, y - b.box[3]))
            for name, b in labels.items()
        }
        assert min(dist, key=dist.__getitem__) == f.label
        assert dist[f.label] < 80 + 2 * labels[f.label].font_px, dist


def test_text_and_markers_are_legible_on_white_tissue(tmp_path: Path, engine: TinyEngine) -> None:
    """The worst case: the whole image saturated white (dense tissue, a bright window)."""
    a, ds, truth = _chest(tmp_path, engine, effusion="left")
    a.result.images[0].findings = _chest_findings(truth)
    a.result.images[0].heatmaps = {}
    white = np.ones_like(a.prepared[0].display)
    px, boxes = _render(a, caption="PA", display=white)
    for b in boxes:
        _assert_legible(px, b)
    # the yellow contour has a black edge: around the nodule's outline there are dark pixels on white
    (nodule,) = [f for f in truth["findings"] if f["kind"] == "nodule"]
    k = px.shape[0] / ds.Rows
    cx, cy, r = (v * k for v in (*nodule["center_xy"], nodule["radius"]))
    ring = px[int(cy - r - 4) : int(cy + r + 5), int(cx - r - 4) : int(cx + r + 5)].reshape(-1, 3)
    assert (ring.max(axis=1) < 60).sum() > 20
    assert ((ring[:, 0] > 200) & (ring[:, 1] > 200) & (ring[:, 2] < 60)).sum() > 20  # and the yellow line


def test_summary_line_family() -> None:
    img = ImageResult("1.2.3", "1.2.4", "1.2.5", None, "PA", [], 0.82)
    img.findings = [Finding("effusion", 0.03, 0.5, False), Finding("nodule", 0.82, 0.5, True)]
    res = StudyResult("1.2.6", "cxr", "1.0.0", "cxr", False, [img], None, 0.82)
    assert summary_line(img, res) == "AI: nodule 0.82 (positive); effusion 0.03; NOT FOR CLINICAL USE"
    res.clinical_use = True
    assert summary_line(img, res) == "AI: nodule 0.82 (positive); effusion 0.03"
    img.findings = [Finding("a", 0.4, 0.3, True), Finding("b", 0.9, 0.95, False), Finding("c", 0.2, 0.1, True)]
    assert summary_line(img, res) == "AI: a 0.40 (positive); c 0.20 (positive); b 0.90"  # positives first
    img.findings = []
    assert summary_line(img, res) == "AI: no findings"


def test_summary_that_does_not_fit_gets_smaller_then_wraps(tmp_path: Path, engine: TinyEngine) -> None:
    """A small image (the phantom's 320x256, drawn 1:1) with many labels: every part is still drawn, inside
    the image, each line within the width, at no less than the minimum size."""
    study = chest_study(tmp_path, seed=2)
    ds = pydicom.dcmread(study["files"][0])
    a = analyse([ds], tiny_manifest(), engine.infer, 8, 10**8)
    a.result.images[0].findings = [Finding(f"finding{i}", 0.1 * i, 0.5, i > 6) for i in range(1, 10)]
    px, boxes = _render(a)
    (summary,) = [b for b in boxes if b.kind == "summary"]
    assert px.shape[:2] == (320, 256) and summary.font_px >= MIN_FONT_PX and len(summary.lines) > 1
    assert "; ".join(summary.lines) == summary_line(a.result.images[0], a.result)
    assert _inside(summary.box, px.shape)
    _assert_legible(px, summary)


def _mammo(tmp: Path, engine: TinyEngine) -> Analysis:
    study = mammo_study(tmp, seed=1, size=MAMMO_SIZE, masses={"L": 1})
    dss = [pydicom.dcmread(f) for f in study["files"]]
    m = tiny_manifest(task="mmg", label="mass", modalities=("MG",))
    return analyse(dss, m, engine.infer, 4, 10**8)


def test_mammogram_scs_show_laterality_and_view_and_never_mix_sides_in_a_series(
    tmp_path: Path, engine: TinyEngine
) -> None:
    a = _mammo(tmp_path, engine)
    res = a.result
    scs = [
        _roundtrip(build_sc(img, src, prep.display, res, i, 1024, prep.display_factor))
        for i, (img, src, prep) in enumerate(zip(res.images, a.sources, a.prepared, strict=True))
    ]
    series: dict[str, set[str]] = {}
    for img, src, sc in zip(res.images, a.sources, scs, strict=True):
        side, view = str(src.ImageLaterality), str(src.ViewPosition)
        series.setdefault(sc.SeriesInstanceUID, set()).add(side)
        assert sc.Laterality == side and f" {side} " in sc.SeriesDescription
        px, boxes = _render(a, res.images.index(img), image_caption(img, src))
        (caption,) = [b for b in boxes if b.kind == "caption"]
        assert caption.text == f"{side} {view}"  # "L CC", "R MLO"
        assert caption.font_px > next(b for b in boxes if b.kind == "info").font_px  # read first
        _assert_legible(px, caption)
        info = next(b for b in boxes if b.kind == "info").text
        assert f"{side} breast score {res.per_breast[side]:.2f}" in info
    assert sorted(sorted(s) for s in series.values()) == [["L"], ["R"]]  # one series per side
    assert len({sc.SeriesNumber for sc in scs}) == 2
    assert {sc.StudyInstanceUID for sc in scs} == {res.study_instance_uid}


def test_images_without_laterality_keep_the_one_sc_series(tmp_path: Path, engine: TinyEngine) -> None:
    """A chest has no laterality: its SC series UID is the one derived before series were split by side
    (re-running an old study re-creates the same series)."""
    a, ds, _ = _chest(tmp_path, engine)
    res = a.result
    sc = build_sc(res.images[0], ds, a.prepared[0].display, res, 0, 1024, a.prepared[0].display_factor)
    legacy = uids.derive_uid("sc-series", res.study_instance_uid, res.bundle_id, res.bundle_version)
    assert sc.SeriesInstanceUID == legacy and sc.SeriesNumber == 9902
    assert len({legacy, *(uids.sc_series_uid(legacy, "b", "1", s) for s in ("L", "R"))}) == 3


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (("R-10242", "SRT", "cranio-caudal"), "L CC"),
        (("399162004", "SCT", "cranio-caudal"), "L CC"),
        (("R-10226", "SRT", "medio-lateral oblique"), "L MLO"),
        (("399368009", "SCT", "medio-lateral oblique"), "L MLO"),
        (("399192008", "SCT", "cranio-caudal exaggerated laterally"), "L XCCL"),
        (("R-10224", "SRT", "medio-lateral"), "L ML"),
        (("999999", "99LOCAL", "tangential"), "L tangential"),
    ],
)
def test_caption_view_from_view_code_sequence_without_view_position(
    tmp_path: Path, engine: TinyEngine, code: tuple[str, str, str], expected: str
) -> None:
    """View Position is optional in MG; View Code Sequence (PS3.3 C.8.11.5) is required: SRT and SCT."""
    a = _mammo(tmp_path, engine)
    img = next(i for i in a.result.images if i.laterality == "L")
    src = next(s for s in a.sources if s.SOPInstanceUID == img.sop_instance_uid)
    img.view = None
    del src.ViewPosition
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    src.ViewCodeSequence = Sequence([item])
    assert image_caption(img, src) == expected


def _procedure(sr: Dataset) -> list[tuple[str, str, str]]:
    """(value, scheme, meaning) of each TID 1500 "Procedure reported" (121058, DCM) item, read back."""
    out = []
    for item in _roundtrip(sr).ContentSequence:
        name = item.ConceptNameCodeSequence[0]
        if (name.CodeValue, name.CodingSchemeDesignator) == ("121058", "DCM"):
            code = item.ConceptCodeSequence[0]
            out.append((code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning))
    return out


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def test_sr_procedure_title_follows_the_study(tmp_path: Path, engine: TinyEngine) -> None:
    a, ds, _ = _chest(tmp_path, engine)
    m = tiny_manifest()

    def title() -> list[tuple[str, str, str]]:
        return _procedure(build_sr(a.result, a.sources, m.title))

    assert [t[1:] for t in title()] == [("99CLINICAI", "PHANTOM CHEST")]  # the phantom's Study Description
    ds.StudyDescription = "XR CHEST PA 1 VIEW"
    assert [t[2] for t in title()] == ["XR CHEST PA 1 VIEW"]
    del ds.StudyDescription
    ds.RequestAttributesSequence = Sequence([Dataset()])
    ds.RequestAttributesSequence[0].RequestedProcedureDescription = "CHEST PA"
    assert [t[2] for t in title()] == ["CHEST PA"]
    del ds.RequestAttributesSequence
    assert [t[2] for t in title()] == ["DX CHEST"]  # modality + Body Part Examined
    ds.RequestedProcedureCodeSequence = Sequence([_code("RPID16", "RADLEX", "XR Chest 1 View")])
    assert title() == [("RPID16", "RADLEX", "XR Chest 1 View")]  # a code beats any text
    ds.ProcedureCodeSequence = Sequence([_code("36572-6", "LN", "XR Chest PA")])
    assert title() == [("36572-6", "LN", "XR Chest PA")]  # the study's own procedure code first
    assert all("2V" not in t[2] for t in title())
    again = [t[0] for t in _procedure(build_sr(a.result, a.sources, m.title))]
    assert again == [t[0] for t in title()]  # deterministic


def test_sr_procedure_title_of_a_mammogram_and_of_a_bare_image(tmp_path: Path, engine: TinyEngine) -> None:
    a = _mammo(tmp_path, engine)
    assert [c.meaning for c in procedure_reported(a.sources)] == ["PHANTOM MAMMO"]
    for s in a.sources:
        del s.StudyDescription
    assert [c.meaning for c in procedure_reported(a.sources)] == ["MG BREAST"]
    bare = Dataset()
    assert [(c.value, c.scheme_designator) for c in procedure_reported([bare])] == [("363679005", "SCT")]
    broken = Dataset()
    broken.ProcedureCodeSequence = Sequence([Dataset()])  # an empty code item is skipped, not a crash
    broken.StudyDescription = "MG SCREENING BILATERAL"
    assert [c.meaning for c in procedure_reported([broken])] == ["MG SCREENING BILATERAL"]


@pytest.mark.integration  # the shipped reference models end to end
def test_reference_models_on_phantoms_label_every_positive_finding(tmp_path: Path) -> None:
    from appliance.pipeline.analyse import analyse_route
    from appliance.pipeline.results import build_objects
    from appliance.pipeline.router import route
    from testsupport.reference import reference_engines

    settings, engines = reference_engines(tmp_path / "home")
    studies = [
        chest_study(tmp_path / "in", seed=5, size="real", nodules=1, effusion="left"),
        mammo_study(tmp_path / "in", seed=3, size="real", masses={"L": 1}),
    ]
    positives = 0
    for study in studies:
        dss = [pydicom.dcmread(f) for f in study["files"]]
        (r,) = route(engines.active(), dss, settings.pipeline.routes)
        a = analyse_route(r, settings.pipeline)
        for i, (img, src) in enumerate(zip(a.result.images, a.sources, strict=True)):
            px, boxes = _render(a, i, image_caption(img, src))
            located = {f.label for f in img.findings if f.positive and f.location is not None}
            assert {b.finding for b in boxes if b.kind == "label"} == located
            positives += len(located)
            for b in boxes:
                _assert_legible(px, b)
            if src.Modality == "MG":
                assert next(b for b in boxes if b.kind == "caption").text == f"{src.ImageLaterality} {src.ViewPosition}"
        objects = build_objects(a, r.manifest, settings.pipeline.sc_max_size)
        sides: dict[str, set[str]] = {}
        for kind, ds in objects:
            if kind == "SC":
                sides.setdefault(ds.SeriesInstanceUID, set()).add(ds.get("Laterality", ""))
            else:
                assert [t[2] for t in _procedure(ds)] == [dss[0].StudyDescription]
        assert all(len(s) == 1 for s in sides.values()), sides
    assert positives >= 3  # the nodule, the effusion, the left mass (on at least one view)


@pytest.mark.parametrize("rows, cols", [(16, 16), (17, 300), (64, 4000)])
def test_a_tiny_or_skinny_image_gets_a_canvas_with_room_for_legible_text(
    tmp_path: Path, engine: TinyEngine, rows: int, cols: int
) -> None:
    """An image that passed ``min_image_size`` but is too short or narrow for the banner, labels and summary
    (16x16, 17x300, a 4000x64 strip reduced to 1024x16) still gets its SC: the image at the top left of a
    black canvas at least MIN_CANVAS on each side, every text box legible and inside the canvas, and the SC's
    Pixel Spacing that of the image (the margin has the same pixel size)."""
    from appliance.pipeline.results_sc import MIN_CANVAS

    a, ds, _ = _chest(tmp_path, engine)
    img = a.result.images[0]
    display = np.linspace(0.0, 1.0, rows * cols, dtype=np.float32).reshape(rows, cols)
    px, boxes = render_overlay(img, display, (0.2, 0.2), a.result, 1024, 1, "PA")
    assert px.shape[0] >= MIN_CANVAS and px.shape[1] >= MIN_CANVAS
    for box in boxes:
        assert _inside(box.box, px.shape) and box.box[3] > box.box[1], box
        _assert_legible(px, box)
    small = ds.copy()
    small.Rows, small.Columns = rows, cols
    small.PixelSpacing = [0.2, 0.2]
    sc = build_sc(img, small, display, a.result, 0, 1024, 1)
    assert (sc.Rows, sc.Columns) == px.shape[:2]
    content_cols = min(cols, 1024)
    assert float(sc.PixelSpacing[1]) == pytest.approx(cols * 0.2 / content_cols)


@pytest.mark.parametrize(
    ("description", "meaning"),
    [
        (["CHEST PA", "LAT"], "CHEST PA LAT"),  # multi-valued LO: one line, not a Python list
        ("CHEST\tPA\x1b[31m\\X", "CHEST PA [31m X"),  # control characters and the value delimiter dropped
    ],
)
def test_sr_procedure_title_is_one_clean_line(tmp_path: Path, engine: TinyEngine, description, meaning) -> None:
    a, ds, _ = _chest(tmp_path, engine)
    ds.StudyDescription = description
    (concept,) = [c for c in procedure_reported([ds]) if c.scheme_designator == "99CLINICAI"]
    assert concept.meaning == meaning
