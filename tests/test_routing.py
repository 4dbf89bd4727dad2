"""Routing from the attributes the standard requires (issue 10, item 3).

The field case ``mg_view_only_in_code_sequence`` (copy in ``tests/cases/``): a 4-view screening mammogram, mass
in the left breast, whose View Position (0018,5101) is absent; the view is only in View Code Sequence
(0054,0220), which the MG IOD requires (PS3.3 C.8.11.7). Right outcome: routed to the mammography model from
the coded view and laterality, the mass found on the left (offline ``appliance infer`` and through the daemon:
storescu in, Orthanc as the PACS).

Other members of the family, on the real reference manifests: MLO coded, SRT vs SCT designators for one
concept (PS3.16 CID 4014 / CID 4010 / CID 4031), laterality only in the frame-level Frame Laterality
(C.7.6.16.2.8) or only in the series Laterality (C.7.3.1), anatomy only in Anatomic Region Sequence
(C.8.11.2), view modifiers (CID 4015), manifests stating ``applies_to`` in codes, the signed reference bundles
verifying and routing as before, and a ``no_model`` / ``not_analysed`` detail that says why, per image.
"""

from __future__ import annotations

import io
import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from appliance.app.infer_offline import run_offline
from appliance.core.config import RouteRule, Settings
from appliance.models.active import DEMO_PUBLIC_KEY, reference_bundles
from appliance.pipeline import postprocess
from appliance.pipeline.anatomy import laterality_of, region_of, view_of
from appliance.pipeline.router import explain, image_matches, refusal, route
from appliance.pipeline.worker import StaticBundles
from engines.bundle import read_manifest_unverified, verify_bundle
from engines.keys import TrustStore, read_public_key_file
from engines.manifest import Manifest, canonical_bytes
from engines.reference.phantoms import to_dicom
from testsupport.common import PYTHON, ROOT, wait_until
from testsupport.daemon import reference_pipeline_to_pacs, running_daemon
from testsupport.dcmtk import storescu
from testsupport.orthanc import AET, Orthanc
from testsupport.pipeline import TinyEngine
from testsupport.reference import write_case

CASE = "mg_view_only_in_code_sequence"
SHARED_CASE = ROOT.parent / "shared" / "cases" / f"{CASE}.py"

# PS3.16 codes, SCT and the retired SRT designator of the same concept
CC_SCT, CC_SRT = ("399162004", "SCT", "cranio-caudal"), ("R-10242", "SRT", "cranio-caudal")
MLO_SCT, MLO_SRT = ("399368009", "SCT", "medio-lateral oblique"), ("R-10226", "SRT", "medio-lateral oblique")
XCCL_SCT = ("399192008", "SCT", "cranio-caudal exaggerated laterally")
SPOT_SCT = ("399055006", "SCT", "Spot Compression")  # CID 4015
BREAST_SCT, BREAST_SRT = ("76752008", "SCT", "Breast"), ("T-04000", "SRT", "Breast")
CHEST_SRT, CHEST_SCT_NEW = ("T-D3000", "SRT", "Chest"), ("816094009", "SCT", "Chest")
PA_SRT, AP_SCT = ("R-10214", "SRT", "postero-anterior"), ("399348003", "SCT", "antero-posterior")


def _item(code: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    return item


def _refs() -> dict[str, Manifest]:
    return {m.bundle_id: m for m in (read_manifest_unverified(p) for p in reference_bundles())}


@pytest.fixture(scope="module")
def refs() -> dict[str, Manifest]:
    """The manifests of the shipped, signed reference bundles (cxr-phantom, mmg-phantom)."""
    return _refs()


def mg(
    *,
    view: tuple[str, str, str] | None = CC_SCT,
    position: str | None = None,
    image_lat: str | None = "L",
    series_lat: str | None = None,
    body_part: str | None = "BREAST",
    region: tuple[str, str, str] | None = None,
    modifiers: tuple[tuple[str, str, str], ...] = (),
) -> Dataset:
    """An MG image (tiny pixels) with exactly the view / anatomy / laterality attributes given."""
    ds = to_dicom(np.zeros((256, 208)), modality="MG", laterality="L", view_position="CC", body_part="BREAST")
    for keyword in ("ViewPosition", "ViewCodeSequence", "ImageLaterality", "Laterality", "BodyPartExamined"):
        if keyword in ds:
            delattr(ds, keyword)
    if view is not None:
        item = _item(view)
        if modifiers:
            item.ViewModifierCodeSequence = DicomSequence([_item(m) for m in modifiers])
        ds.ViewCodeSequence = DicomSequence([item])
    if position is not None:
        ds.ViewPosition = position
    if image_lat is not None:
        ds.ImageLaterality = image_lat
    if series_lat is not None:
        ds.Laterality = series_lat
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if region is not None:
        ds.AnatomicRegionSequence = DicomSequence([_item(region)])
    return ds


def dx(
    *, view: tuple[str, str, str] | None, region: tuple[str, str, str] | None, position: str | None = None
) -> Dataset:
    """A DX chest image whose view / anatomy are given only as stated (no Body Part Examined unless ``region``
    is None)."""
    ds = to_dicom(np.zeros((256, 208)), modality="DX", view_position="PA", body_part="CHEST")
    del ds.ViewPosition
    if position is not None:
        ds.ViewPosition = position
    if view is not None:
        ds.ViewCodeSequence = DicomSequence([_item(view)])
    if region is not None:
        del ds.BodyPartExamined
        ds.AnatomicRegionSequence = DicomSequence([_item(region)])
    return ds


def with_codes(m: Manifest, **applies: object) -> Manifest:
    doc = m.model_dump(mode="json")
    doc["applies_to"].update(applies)
    return Manifest.model_validate(doc)


# -- the signed reference bundles: unchanged bytes, still verify ---------------------------------------------------


def test_signed_reference_bundles_still_verify_with_unchanged_canonical_bytes(tmp_path: Path) -> None:
    kid, pub = read_public_key_file(DEMO_PUBLIC_KEY)
    trust = TrustStore.from_config({kid: pub})
    legacy = sorted((Path(__file__).parent / "data" / "legacy-bundles").glob("*.bundle"))  # signed before the codes
    assert len(legacy) == 2
    for path in legacy:
        verified = verify_bundle(path, trust)
        doc = json.loads(canonical_bytes(verified.manifest))
        assert set(doc["applies_to"]) == {"modalities", "body_parts", "views", "sop_classes"}
    for path in reference_bundles():  # 1.0.2 states its input contract (issue 16), signed
        assert "input_contract" in json.loads(canonical_bytes(verify_bundle(path, trust).manifest))["applies_to"]


def test_coded_applies_to_round_trips_and_defaults_stay_out_of_the_canonical_form(refs: dict[str, Manifest]) -> None:
    m = with_codes(
        refs["mmg-phantom"],
        views=[],
        view_codes=[{"value": CC_SCT[0], "scheme_designator": "SCT", "meaning": CC_SCT[2]}],
        view_modifiers=[],
        anatomy_codes=[{"value": BREAST_SRT[0], "scheme_designator": "SRT"}],
        lateralities=["L", "R"],
    )
    raw = canonical_bytes(m)
    again = Manifest.model_validate_json(raw)
    assert canonical_bytes(again) == raw and again.applies_to.view_modifiers == []
    assert json.loads(raw)["applies_to"]["lateralities"] == ["L", "R"]
    plain = with_codes(refs["cxr-phantom"], view_modifiers=None)  # cxr-phantom states no view modifiers
    assert canonical_bytes(plain) == canonical_bytes(refs["cxr-phantom"])


# -- the case and its family, on the real reference manifests ------------------------------------------------------


@pytest.mark.parametrize("code", [CC_SCT, CC_SRT, MLO_SCT, MLO_SRT], ids=["CC-SCT", "CC-SRT", "MLO-SCT", "MLO-SRT"])
def test_view_only_in_view_code_sequence_routes_to_mammography(refs: dict[str, Manifest], code) -> None:
    ds = mg(view=code)
    assert "ViewPosition" not in ds
    assert image_matches(refs["mmg-phantom"], ds) and not image_matches(refs["cxr-phantom"], ds)
    term = "CC" if code in (CC_SCT, CC_SRT) else "MLO"
    assert view_of(ds).term == term and postprocess.view_of(ds) == term


def case_in_process(out: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The case's files, written by its script (the copy in ``tests/cases``) run in this process."""
    script = ROOT / "tests" / "cases" / f"{CASE}.py"
    with monkeypatch.context() as m:
        m.setattr(sys, "argv", [str(script), str(out)])
        runpy.run_path(str(script), run_name="__main__")
    return sorted(out.glob("*.dcm"))


def test_the_field_case_files_route_by_code(
    tmp_path: Path, refs: dict[str, Manifest], monkeypatch: pytest.MonkeyPatch
) -> None:
    files = case_in_process(tmp_path / "case", monkeypatch)
    images = [pydicom.dcmread(f) for f in files]
    assert len(images) == 4 and not any("ViewPosition" in ds for ds in images)
    routes = route([(refs["mmg-phantom"], TinyEngine()), (refs["cxr-phantom"], TinyEngine())], images, [])
    assert [r.manifest.bundle_id for r in routes] == ["mmg-phantom"] and len(routes[0].images) == 4
    assert sorted((postprocess.laterality(ds), postprocess.view_of(ds)) for ds in images) == [
        ("L", "CC"),
        ("L", "MLO"),
        ("R", "CC"),
        ("R", "MLO"),
    ]


def test_coded_view_wins_over_a_contradicting_view_position(refs: dict[str, Manifest]) -> None:
    """View Code Sequence is the attribute the MG IOD requires; View Position is only the fall-back."""
    ds = mg(view=XCCL_SCT, position="CC")
    assert view_of(ds).term == "XCCL"
    why = refusal(refs["mmg-phantom"], ds)
    assert why is not None and "view XCCL (View Code Sequence SCT 399192008" in why and "CC, MLO" in why
    assert image_matches(refs["mmg-phantom"], mg(view=None, position="MLO"))  # no code: View Position


def test_a_coded_view_this_build_cannot_name_is_never_taken_for_the_stale_view_position(
    refs: dict[str, Manifest],
) -> None:
    """An oblique chest or a breast specimen radiograph coded in View Code Sequence, with a left-over View
    Position of PA / CC: no bundle that states its views by name may take it (it would analyse the wrong
    view); the reason names the code. Likewise a coded anatomy overrides Body Part Examined."""
    lao = dx(view=("399135007", "SCT", "left anterior oblique"), region=None, position="PA")
    why = refusal(refs["cxr-phantom"], lao)
    assert why is not None and "SCT 399135007" in why and "PA, AP" in why, why
    specimen = mg(view=("127457009", "SCT", "tissue specimen from breast"), position="CC")
    why = refusal(refs["mmg-phantom"], specimen)
    assert why is not None and "SCT 127457009" in why, why
    knee = mg(region=("72696002", "SCT", "Knee"), body_part="BREAST")
    assert refusal(refs["mmg-phantom"], knee) is not None


def test_text_where_a_code_sequence_belongs_counts_as_absent(refs: dict[str, Manifest]) -> None:
    """A broken or hostile file with a string in View Code Sequence or View Modifier Code Sequence: never a
    crash; the image is routed by what else it states."""
    ds = mg(view=None, position="CC")
    ds.add_new(0x00540220, "LO", "CC")  # View Code Sequence holding text
    ds.add_new(0x00540222, "LO", "SPOT")  # View Modifier Code Sequence holding text
    assert view_of(ds).code is None and view_of(ds).term == "CC"
    assert image_matches(refs["mmg-phantom"], ds)


def test_image_without_any_view_is_refused_with_the_reason(refs: dict[str, Manifest]) -> None:
    why = refusal(refs["mmg-phantom"], mg(view=None))
    assert why == "view unknown (no View Code Sequence, no View Position) not in CC, MLO"


def test_anatomy_only_in_anatomic_region_sequence(refs: dict[str, Manifest]) -> None:
    for code in (BREAST_SCT, BREAST_SRT):
        ds = mg(body_part=None, region=code)
        assert region_of(ds).term == "BREAST" and image_matches(refs["mmg-phantom"], ds)
    for region in (CHEST_SRT, CHEST_SCT_NEW):
        chest = dx(view=PA_SRT, region=region)
        assert "BodyPartExamined" not in chest and "ViewPosition" not in chest
        assert image_matches(refs["cxr-phantom"], chest), refusal(refs["cxr-phantom"], chest)
    assert image_matches(refs["cxr-phantom"], dx(view=AP_SCT, region=None))
    knee = dx(view=PA_SRT, region=("72696002", "SCT", "Knee"))
    assert (
        refusal(refs["cxr-phantom"], knee) == 'anatomy KNEE (Anatomic Region Sequence SCT 72696002 "Knee") not in CHEST'
    )


def test_laterality_from_series_frame_level_or_anatomic_region_modifier() -> None:
    assert laterality_of(mg(image_lat=None, series_lat="R")) == "R"
    assert postprocess.laterality(mg(image_lat="U", series_lat="L")) == "L"  # U (unpaired) is not a side
    frame = mg(image_lat=None)
    anatomy = Dataset()
    anatomy.FrameLaterality = "R"
    anatomy.AnatomicRegionSequence = DicomSequence([_item(BREAST_SCT)])
    shared = Dataset()
    shared.FrameAnatomySequence = DicomSequence([anatomy])
    frame.SharedFunctionalGroupsSequence = DicomSequence([shared])
    assert laterality_of(frame) == postprocess.laterality(frame) == "R"
    per_frame = mg(image_lat=None)
    groups = []
    for _ in range(3):
        g, a = Dataset(), Dataset()
        a.FrameLaterality = "L"
        g.FrameAnatomySequence = DicomSequence([a])
        groups.append(g)
    per_frame.PerFrameFunctionalGroupsSequence = DicomSequence(groups)
    assert laterality_of(per_frame) == "L"
    groups[1].FrameAnatomySequence[0].FrameLaterality = "R"  # frames disagree: no single side
    assert laterality_of(per_frame) is None
    coded = mg(image_lat=None, body_part=None, region=BREAST_SCT)
    coded.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = DicomSequence([_item(("7771000", "SCT", "Left"))])
    assert laterality_of(coded) == "L"
    assert laterality_of(mg(image_lat="B")) == "B" and postprocess.laterality(mg(image_lat="B")) is None


def test_manifest_stated_in_codes_takes_codes_of_either_designator_and_view_position(
    refs: dict[str, Manifest],
) -> None:
    m = with_codes(
        refs["mmg-phantom"],
        body_parts=[],
        views=[],
        view_codes=[{"value": v, "scheme_designator": s, "meaning": t} for v, s, t in (CC_SCT, MLO_SRT)],
        anatomy_codes=[{"value": BREAST_SCT[0], "scheme_designator": "SCT"}],
    )
    for ds in (mg(view=CC_SRT), mg(view=MLO_SCT), mg(view=None, position="CC"), mg(body_part=None, region=BREAST_SRT)):
        assert image_matches(m, ds), refusal(m, ds)
    assert not image_matches(m, mg(view=XCCL_SCT))
    assert not image_matches(m, mg(body_part="CHEST"))


def test_view_modifiers_and_lateralities_when_the_manifest_states_them(refs: dict[str, Manifest]) -> None:
    spot = mg(view=CC_SCT, modifiers=(SPOT_SCT,))
    assert refs["mmg-phantom"].applies_to.view_modifiers == []  # 1.0.2 takes no spot/magnification/implant views
    assert image_matches(with_codes(refs["mmg-phantom"], view_modifiers=None), spot)  # a manifest stating none
    strict = with_codes(refs["mmg-phantom"], view_modifiers=[], lateralities=["L", "R"])
    assert refusal(strict, spot) == 'view modifier SCT 399055006 "Spot Compression" not taken'
    assert image_matches(strict, mg(view=CC_SRT))
    assert refusal(strict, mg(image_lat="U")) == "laterality unknown not in L, R"
    spots_ok = with_codes(refs["mmg-phantom"], view_modifiers=[{"value": "399055006", "scheme_designator": "SCT"}])
    assert image_matches(spots_ok, spot)


def test_route_rules_match_coded_anatomy(refs: dict[str, Manifest]) -> None:
    images = [mg(body_part=None, region=BREAST_SRT)]
    bundles = [(refs["mmg-phantom"], TinyEngine())]
    rule = RouteRule(bundle_id="mmg-phantom", action="exclude", body_parts=["BREAST"])
    assert route(bundles, images, []) and not route(bundles, images, [rule])
    assert "mmg-phantom: excluded by the local route rules" in explain(bundles, images, [rule])


# -- no_model says why, per image ------------------------------------------------------------------------------------


def test_no_model_detail_names_each_image_and_each_bundles_reason(refs: dict[str, Manifest]) -> None:
    images = [mg(view=XCCL_SCT), mg(view=None), mg(view=None)]
    bundles = [(refs["cxr-phantom"], TinyEngine()), (refs["mmg-phantom"], TinyEngine())]
    assert not route(bundles, images, [])
    detail = explain(bundles, images, [])
    first, rest = detail.removeprefix("no active model applies: ").split(" | ")
    assert first == (
        f"image …{images[0].SOPInstanceUID[-12:]}: cxr-phantom: modality MG not in DX, CR; "
        'mmg-phantom: view XCCL (View Code Sequence SCT 399192008 "cranio-caudal exaggerated laterally") not in CC, MLO'
    )
    assert rest.startswith("2 images …") and "mmg-phantom: view unknown (no View Code Sequence" in rest
    assert "CASE" not in detail and str(images[0].PatientName) not in detail  # codes and UID tails only


def test_offline_a_view_the_model_refuses_is_not_analysed_with_the_reason(
    tmp_path: Path, refs: dict[str, Manifest]
) -> None:
    """The mammography model's modality matches an XCCL view it was not made for: not ``no_model`` (a model
    would have taken the study) but ``not_analysed``, the reason per image (issue 16)."""
    src = tmp_path / "in"
    src.mkdir()
    ds = mg(view=XCCL_SCT)
    ds.save_as(src / "xccl.dcm", enforce_file_format=True)
    bundles = StaticBundles([(refs["mmg-phantom"], TinyEngine())])
    report = run_offline(Settings(state_dir=tmp_path / "home"), [src], None, bundles=bundles)
    (study,) = report["studies"]
    assert study["state"] == "not_analysed" and study["results"] == []
    assert study["reason"] == (
        f"AI not applied: mmg-phantom: image …{ds.SOPInstanceUID[-12:]}: view XCCL (View Code Sequence "
        'SCT 399192008 "cranio-caudal exaggerated laterally") not in CC, MLO'
    )
    assert [(n["bundle_id"], n["category"]) for n in study["not_applied"]] == [("mmg-phantom", "view")]


def test_shared_field_case_script_still_matches_the_copy(tmp_path: Path) -> None:
    if not SHARED_CASE.exists():
        pytest.skip("shared field cases not present on this machine")
    ours = (ROOT / "tests" / "cases" / f"{CASE}.py").read_text()
    assert "del ds.ViewPosition" in SHARED_CASE.read_text() and "del ds.ViewPosition" in ours


# -- end to end: offline `appliance infer` and the daemon ------------------------------------------------------------


def _assert_left_mass(findings: list[dict], per_breast: dict[str, float]) -> None:
    """The case's right outcome: the mass is found on the left (both left views positive, no right view)."""
    positive = {(f["laterality"], f["view"]) for f in findings if f["positive"]}
    assert positive == {("L", "CC"), ("L", "MLO")}, findings
    threshold = findings[0]["threshold"]
    assert per_breast["L"] >= threshold > per_breast["R"], (per_breast, threshold)


@pytest.mark.integration
def test_case_offline_appliance_infer_finds_the_left_mass(tmp_path: Path) -> None:
    case = write_case(CASE, tmp_path / "case")
    out = subprocess.run(
        [PYTHON, "-m", "appliance", "--home", str(tmp_path / "home"), "infer", str(case), "--json"],
        cwd=ROOT,
        env={
            "PYTHONPATH": str(ROOT),
            "PATH": "/usr/bin:/bin",
            # the reference bundles, signed by the demo key: an explicit opt-in (both default to false)
            "APPLIANCE_ENGINES__TRUST_DEMO_KEY": "true",
            "APPLIANCE_ENGINES__INSTALL_REFERENCE_BUNDLES": "true",
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    (study,) = json.loads(out.stdout)["studies"]
    assert study["state"] == "inferred" and study["reason"] is None
    (result,) = study["results"]
    assert result["bundle_id"] == "mmg-phantom" and len({f["image_sop_uid"] for f in result["findings"]}) == 4
    _assert_left_mass(result["findings"], result["per_breast"])


def _num_items(sr: pydicom.Dataset) -> dict[str, float]:
    out: dict[str, float] = {}

    def walk(items) -> None:
        for item in items:
            if item.ValueType == "NUM":
                out[item.ConceptNameCodeSequence[0].CodeMeaning] = float(item.MeasuredValueSequence[0].NumericValue)
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return out


@pytest.mark.integration
def test_case_through_the_daemon_is_analysed_and_a_no_model_study_says_why(
    home: Path, tmp_path: Path, orthanc: Orthanc
) -> None:
    """storescu -> daemon (reference bundles, ONNX Runtime) -> Orthanc: the case ends exported with the mass on
    the left in the SR; an MG study whose only view is one the mammography model does not take ends
    ``not_analysed`` naming the image, with the "AI not applied" notice in the PACS (issue 16)."""
    case = sorted(str(p) for p in write_case(CASE, tmp_path / "case").glob("*.dcm"))
    study_uid = pydicom.dcmread(case[0]).StudyInstanceUID
    odd = mg(view=XCCL_SCT)
    odd_path = tmp_path / "odd" / "xccl.dcm"
    odd_path.parent.mkdir()
    odd.save_as(odd_path, enforce_file_format=True)
    cfg, env = reference_pipeline_to_pacs(orthanc.dicom_port, AET)
    with running_daemon(home, config_toml=cfg, env=env) as d:
        for files in (case, [str(odd_path)]):
            sent = storescu(d.port, files)
            assert sent.stdout.count("Received Store Response (Success)") == len(files), sent.stdout

        def results_in_pacs() -> list[dict] | None:
            tags = orthanc.instances_of_study(study_uid)
            return tags if sorted(t.get("Modality") for t in tags) == ["OT"] * 4 + ["SR"] else None

        tags = wait_until(results_in_pacs, timeout=120, interval=0.3, what="SR + 4 SC in Orthanc")
        sr_id = next(t["_id"] for t in tags if t["Modality"] == "SR")
        scores = _num_items(pydicom.dcmread(io.BytesIO(orthanc.instance_file(sr_id))))
        summary = d.query("SELECT summary FROM results WHERE study_uid=? AND bundle_id='mmg-phantom'", (study_uid,))
        findings = json.loads(summary[0]["summary"])["findings"]
        _assert_left_mass(findings, {"L": scores["AI left breast score"], "R": scores["AI right breast score"]})
        wait_until(lambda: d.studies("exported"), timeout=60, what="the case exported")
        (row,) = wait_until(lambda: d.studies("not_analysed"), timeout=60, what="the odd study not_analysed")
        assert row["detail"] == (
            f"AI not applied: mmg-phantom: image …{odd.SOPInstanceUID[-12:]}: view XCCL (View Code Sequence "
            'SCT 399192008 "cranio-caudal exaggerated laterally") not in CC, MLO'
        )
        (notice,) = wait_until(
            lambda: orthanc.instances_of_study(str(odd.StudyInstanceUID)) or None, timeout=60, what="the notice"
        )
        assert notice["Modality"] == "OT"  # the "AI not applied" Secondary Capture, not a finding
        assert str(odd.PatientName) not in d.logs()
