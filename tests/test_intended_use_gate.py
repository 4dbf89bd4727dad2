"""The intended-use gate (issue 16, items 1 and 2): a signed input contract per bundle, applied per image.

Truth comes from the standard: SOP Class UIDs from PS3.4/PS3.6 (pydicom's registry), Presentation Intent Type
(PS3.3 C.8.11.1.1.1), Image Type (C.7.6.1.1.2), Conversion Type (C.8.6.1), Burned In Annotation (C.7.6.1),
Patient's Age (PS3.5 6.2 AS), View Modifier Code Sequence (CID 4015 codes). Images come from the phantoms
(``engines.reference.phantoms.to_dicom``) so that a wrong answer is distinguishable: each case changes one
attribute of an image the contract otherwise takes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID

from appliance.app.infer_offline import run_offline
from appliance.core.config import PacsDestination, Settings
from appliance.core.store import Store
from appliance.lifecycle.studies import INFERRED, NO_MODEL, NOT_ANALYSED
from appliance.models.active import DEMO_PUBLIC_KEY
from appliance.pipeline.results_sc import not_applied_note, summary_line
from appliance.pipeline.router import REFUSAL_CATEGORIES, patient_age, refusal, refusal_detail
from appliance.pipeline.worker import PipelineWorker, StaticBundles
from engines.bundle import read_manifest_unverified, verify_bundle
from engines.contracts import (
    BREAST_PROJECTION_FOR_PRESENTATION,
    CR_IMAGE_STORAGE,
    DX_FOR_PRESENTATION,
    MG_FOR_PRESENTATION,
    default_contract_for,
    reference_applies_to,
)
from engines.keys import TrustStore, read_public_key_file
from engines.manifest import AppliesTo, InputContract, Manifest, canonical_bytes
from engines.reference.phantoms import to_dicom
from testsupport.pipeline import TinyEngine, synthetic_image, tiny_manifest

SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
MG_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
SPOT_SCT = ("399055006", "SCT", "Spot Compression")  # PS3.16 CID 4015
MAGNIFICATION_SCT = ("399163009", "SCT", "Magnification")
IMPLANT_DISPLACED_SCT = ("399209000", "SCT", "Implant Displaced")

LEGACY_BUNDLES = sorted((Path(__file__).parent / "data" / "legacy-bundles").glob("*.bundle"))


def contract_manifest(task: str, **contract: object) -> Manifest:
    """The tiny test model with the reference ``applies_to`` of ``task`` (``contract`` overrides its contract)."""
    base = tiny_manifest(task=task, modalities=("MG",) if task == "mmg" else ("DX", "CR"))
    applies = reference_applies_to(task)
    applies["input_contract"] = {**applies["input_contract"], **contract}
    return base.model_copy(update={"applies_to": AppliesTo.model_validate(applies)})


def chest(**kw: object) -> Dataset:
    """A DX PA chest phantom the cxr contract takes (For Presentation, ORIGINAL\\PRIMARY, 12 bits, 320x256, 54Y)."""
    pixels = np.clip(synthetic_image(320, 256, (160, 128), 30).astype(np.float32) / 3200.0, 0, 1)
    return to_dicom(pixels, modality=str(kw.pop("modality", "DX")), **kw)  # type: ignore[arg-type]


def mammo(side: str = "L", view: str = "CC", nodule: bool = True, **kw: object) -> Dataset:
    pixels = np.clip(synthetic_image(256, 208, (128, 104) if nodule else None, 20).astype(np.float32) / 3200.0, 0, 1)
    return to_dicom(pixels, modality="MG", body_part="BREAST", view_position=view, laterality=side, **kw)  # type: ignore[arg-type]


def _code(code: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    return item


# -- the contract's values come from the standard -------------------------------------------------------------


def test_reference_sop_classes_are_the_standards_for_presentation_classes() -> None:
    names = {uid: UID(uid).name for uid in (CR_IMAGE_STORAGE, DX_FOR_PRESENTATION, MG_FOR_PRESENTATION)}
    assert names == {
        CR_IMAGE_STORAGE: "Computed Radiography Image Storage",
        DX_FOR_PRESENTATION: "Digital X-Ray Image Storage - For Presentation",
        MG_FOR_PRESENTATION: "Digital Mammography X-Ray Image Storage - For Presentation",
    }
    assert UID(BREAST_PROJECTION_FOR_PRESENTATION).name == "Breast Projection X-Ray Image Storage - For Presentation"
    assert reference_applies_to("cxr")["sop_classes"] == [CR_IMAGE_STORAGE, DX_FOR_PRESENTATION]
    assert reference_applies_to("mmg")["sop_classes"] == [MG_FOR_PRESENTATION, BREAST_PROJECTION_FOR_PRESENTATION]
    assert default_contract_for("cxr").presentation_intents == ["FOR PRESENTATION"]
    with pytest.raises(ValueError):
        default_contract_for("ct")


def test_the_phantoms_the_contract_takes_are_taken() -> None:
    assert refusal_detail(contract_manifest("cxr"), chest()) is None
    assert refusal_detail(contract_manifest("cxr"), chest(modality="CR")) is None
    assert refusal_detail(contract_manifest("mmg"), mammo()) is None


# -- every refusal category, one attribute changed ------------------------------------------------------------


def _screenshot_sc_labelled_cr_chest_pa() -> Dataset:
    """Issue 16's first case: a grayscale screenshot stored as Secondary Capture, labelled CR / CHEST / PA."""
    ds = chest(modality="CR")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SC_STORAGE
    ds.ConversionType = "WSD"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    return ds


def _set(**attrs: object):
    def edit(ds: Dataset) -> Dataset:
        for k, v in attrs.items():
            setattr(ds, k, v)
        return ds

    return edit


CXR_CASES = [
    ("modality", _set(Modality="CT"), "modality CT not in DX, CR"),
    (
        "sop_class",
        lambda ds: _screenshot_sc_labelled_cr_chest_pa(),
        "Secondary Capture Image Storage (SOP Class UID) not taken: model takes Computed Radiography Image Storage, "
        "Digital X-Ray Image Storage - For Presentation",
    ),
    (
        "sop_class",
        _set(SOPClassUID=DX_FOR_PROCESSING),
        "Digital X-Ray Image Storage - For Processing (SOP Class UID) not taken: model takes Computed Radiography "
        "Image Storage, Digital X-Ray Image Storage - For Presentation",
    ),
    (
        "presentation_intent",
        _set(PresentationIntentType="FOR PROCESSING"),
        "For Processing image (Presentation Intent Type), model takes For Presentation",
    ),
    (
        "image_type",
        _set(ImageType=["DERIVED", "SECONDARY", "SCREEN"]),
        "Image Type DERIVED\\SECONDARY\\SCREEN refused: model takes no DERIVED\\SECONDARY image",
    ),
    (
        "burned_in_annotation",
        _set(BurnedInAnnotation="YES"),
        "Burned In Annotation YES (text in the pixels): model takes images without it",
    ),
    (
        "photometric",
        _set(PhotometricInterpretation="PALETTE COLOR"),
        "Photometric Interpretation PALETTE COLOR not taken: model takes MONOCHROME1, MONOCHROME2",
    ),
    ("bits", _set(BitsStored=8), "Bits Stored 8 not taken: model takes 10, 11, 12, 13, 14, 15, 16"),
    ("size", _set(Rows=199), "Rows 199 below the model's minimum 200"),
    ("size", _set(Columns=8193), "Columns 8193 above the model's maximum 8192"),
    ("anatomy", _set(BodyPartExamined="KNEE"), "anatomy KNEE (Body Part Examined) not in CHEST"),
    ("view", _set(ViewPosition="LL"), "view LL (View Position) not in PA, AP"),
    ("age", _set(PatientAge="012Y"), "patient age 12Y below the model's minimum 18Y (Patient's Age)"),
]


@pytest.mark.parametrize(
    ("category", "edit", "reason"), CXR_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CXR_CASES)]
)
def test_each_refusal_category_on_the_chest_contract(category: str, edit, reason: str) -> None:
    manifest = contract_manifest("cxr")
    ds = edit(chest())
    got = refusal_detail(manifest, ds)
    assert got is not None and (got.category, got.reason) == (category, reason)
    assert refusal(manifest, ds) == reason  # the text API is the same answer
    assert got.category in REFUSAL_CATEGORIES


def test_conversion_type_screen_capture_refused_even_where_sc_is_taken() -> None:
    """A bundle that does take Secondary Capture (its own choice) still refuses a workstation screen capture."""
    m = contract_manifest("cxr", refused_image_types=[])
    m = m.model_copy(
        update={"applies_to": m.applies_to.model_copy(update={"sop_classes": [*m.applies_to.sop_classes, SC_STORAGE]})}
    )
    got = refusal_detail(m, _screenshot_sc_labelled_cr_chest_pa())
    assert got is not None and got.category == "conversion_type"
    assert got.reason == "Conversion Type WSD (workstation screen capture): model takes modality images only"


@pytest.mark.parametrize(
    ("modifier", "meaning"),
    [
        (SPOT_SCT, "Spot Compression"),
        (MAGNIFICATION_SCT, "Magnification"),
        (IMPLANT_DISPLACED_SCT, "Implant Displaced"),
    ],
)
def test_mammo_contract_refuses_spot_magnification_and_implant_displaced_views(modifier, meaning: str) -> None:
    ds = mammo()
    ds.ViewCodeSequence[0].ViewModifierCodeSequence = DicomSequence([_code(modifier)])
    got = refusal_detail(contract_manifest("mmg"), ds)
    assert got is not None and got.category == "view_modifier"
    assert got.reason == f'view modifier SCT {modifier[0]} "{meaning}" not taken'


def test_mammo_contract_refuses_for_processing_and_unknown_laterality() -> None:
    m = contract_manifest("mmg")
    raw = mammo()
    raw.SOPClassUID = MG_FOR_PROCESSING
    got = refusal_detail(m, raw)
    assert got is not None and got.category == "sop_class"
    assert got.reason.startswith("Digital Mammography X-Ray Image Storage - For Processing (SOP Class UID) not taken")
    wrong_intent = mammo()
    wrong_intent.PresentationIntentType = "FOR PROCESSING"
    assert refusal_detail(m, wrong_intent).category == "presentation_intent"  # type: ignore[union-attr]
    both = mammo(side="B")
    got = refusal_detail(m, both)
    assert got is not None and (got.category, got.reason) == ("laterality", "laterality B not in L, R")


# -- age: boundaries (inclusive) and unknown -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("attrs", "taken"),
    [
        ({"PatientAge": "018Y"}, True),  # minimum 18 inclusive
        ({"PatientAge": "017Y"}, False),
        ({"PatientAge": "216M"}, True),  # 216 months = 18 completed years
        ({"PatientAge": "215M"}, False),
        ({"PatientAge": "080Y"}, True),  # maximum 80 inclusive
        ({"PatientAge": "081Y"}, False),
        ({"PatientAge": "", "PatientBirthDate": "20060102", "StudyDate": "20240102"}, True),  # 18th birthday
        ({"PatientAge": "", "PatientBirthDate": "20060102", "StudyDate": "20240101"}, False),  # the day before
        ({"PatientAge": "", "PatientBirthDate": "2006-01-02", "StudyDate": "20240102"}, True),  # no valid age
    ],
)
def test_age_range_is_inclusive_at_both_ends(attrs: dict[str, str], taken: bool) -> None:
    m = contract_manifest("cxr", min_age_years=18, max_age_years=80)
    ds = chest()
    for k, v in attrs.items():
        setattr(ds, k, v)
    got = refusal_detail(m, ds)
    assert (got is None) == taken, got
    if not taken:
        assert got is not None and got.category == "age"


def test_age_reason_names_the_attributes_it_came_from() -> None:
    m = contract_manifest("cxr", min_age_years=18, max_age_years=80)
    ds = chest()
    ds.PatientAge = ""
    ds.PatientBirthDate, ds.StudyDate = "20100101", "20240102"
    assert refusal(m, ds) == "patient age 14Y below the model's minimum 18Y (Patient's Birth Date and Study Date)"
    ds.PatientAge = "090Y"
    assert refusal(m, ds) == "patient age 90Y above the model's maximum 80Y (Patient's Age)"
    assert patient_age(ds) is not None and patient_age(ds).years == 90  # type: ignore[union-attr]
    ds.PatientAge = "006W"
    assert patient_age(ds).years == 0  # type: ignore[union-attr]


@pytest.mark.parametrize("policy", ["accept", "refuse"])
def test_unknown_age_follows_the_manifest_policy(policy: str) -> None:
    m = contract_manifest("cxr", unknown_age=policy)
    ds = chest()
    del ds.PatientBirthDate
    assert "PatientAge" not in ds and patient_age(ds) is None
    got = refusal_detail(m, ds)
    if policy == "accept":
        assert got is None
    else:
        assert got is not None and got.category == "age"
        assert got.reason.startswith("patient age unknown")
    ds.PatientBirthDate = "20300101"  # born after the study: not an age either
    assert patient_age(ds) is None


def test_contract_ranges_are_validated() -> None:
    with pytest.raises(ValueError):
        InputContract(min_age_years=40, max_age_years=30)
    with pytest.raises(ValueError):
        InputContract(refused_image_types=["derived\\secondary"])  # not Code Strings
    with pytest.raises(ValueError):
        InputContract(bits_stored=[0])


# -- old manifests -------------------------------------------------------------------------------------------


def test_old_manifest_without_contract_still_verifies_and_routes_as_before(tmp_path: Path) -> None:
    """The 1.0.1 reference bundles (signed before the contract existed; kept in tests/data/legacy-bundles) verify,
    their canonical bytes carry no ``input_contract``, and they take the images they took before: no contract, no
    new refusal."""
    kid, b64 = read_public_key_file(DEMO_PUBLIC_KEY)
    for path in LEGACY_BUNDLES:
        verify_bundle(path, TrustStore.from_config({kid: b64}))
        m = read_manifest_unverified(path)
        assert m.applies_to.input_contract is None
        assert b"input_contract" not in canonical_bytes(m)
    cxr = {m.bundle_id: m for m in map(read_manifest_unverified, LEGACY_BUNDLES)}["cxr-phantom"]
    processing = chest()
    processing.PresentationIntentType = "FOR PROCESSING"
    assert refusal_detail(cxr, processing) is None  # as before: no contract states an intent
    with_contract = contract_manifest("cxr")
    assert b'"input_contract":{' in canonical_bytes(with_contract)  # a declared contract is signed
    assert Manifest.model_validate_json(canonical_bytes(with_contract)) == with_contract


# -- the worker: not_analysed, no_model, and a mixed study ---------------------------------------------------


def _study(store: Store, spool: Path, datasets: list[Dataset]) -> int:
    from tests.test_worker import add_spooled_study

    return add_spooled_study(store, spool, datasets)


@pytest.fixture
def env(home: Path):
    settings = Settings(state_dir=home)
    settings.pipeline.destinations = [
        PacsDestination(name="pacs", ae_title="PACS", host="127.0.0.1", port=104),
        PacsDestination(name="quiet", ae_title="Q", host="127.0.0.1", port=105, send_ai_not_applied=False),
    ]
    return settings, Store(settings.db_path), home / "spool"


def _state(store: Store, sid: int) -> tuple[str, str]:
    r = store.query("SELECT state, detail FROM studies WHERE id=?", (sid,))[0]
    return r["state"], r["detail"]


def test_a_study_whose_every_image_the_gate_refuses_is_not_analysed_with_a_notice(env) -> None:
    settings, store, spool = env
    m = contract_manifest("cxr")
    raw = [chest(instance_number=1), chest(instance_number=2)]
    raw[0].PresentationIntentType = "FOR PROCESSING"
    raw[1].PatientAge = "010Y"
    engine = TinyEngine()
    sid = _study(store, spool, raw)
    assert PipelineWorker(settings, store, StaticBundles([(m, engine)])).process(sid) == NOT_ANALYSED
    assert engine.calls == 0  # nothing refused is ever given to the model
    state, detail = _state(store, sid)
    assert detail.startswith("AI not applied: tiny-cxr: image …")
    assert "For Processing image (Presentation Intent Type), model takes For Presentation" in detail
    assert "patient age 10Y below the model's minimum 18Y (Patient's Age)" in detail
    (res,) = store.query("SELECT id, summary, study_score FROM results WHERE study_id=?", (sid,))
    summary = json.loads(res["summary"])
    assert summary["not_analysed"] is True and summary["findings"] == [] and res["study_score"] is None
    assert [n["category"] for n in summary["not_applied"]] == ["presentation_intent", "age"]
    (obj,) = store.query("SELECT id, kind, path FROM result_objects WHERE result_id=?", (res["id"],))
    assert obj["kind"] == "NOTICE" and (settings.state_dir / obj["path"]).exists()
    # queued only for the destination that takes notices (send_ai_not_applied, on by default)
    assert [r["destination"] for r in store.query("SELECT destination FROM exports WHERE study_id=?", (sid,))] == [
        "pacs"
    ]
    # a study no bundle's modality matches is still no_model
    ct = chest(study_uid="1.2.826.0.1.3680043.8.498.77")
    ct.Modality = "CT"
    other = _study(store, spool, [ct])
    assert PipelineWorker(settings, store, StaticBundles([(m, TinyEngine())])).process(other) == NO_MODEL


def test_mixed_mammogram_only_for_presentation_views_are_analysed_and_scored(env) -> None:
    """A 4-view study with the MLO views For Processing (bright masses in them: scored, they would dominate):
    only the CC views are analysed; the per-breast and study scores come from them alone; the refused views
    are named in the summary, the SR and every SC."""
    settings, store, spool = env
    m = contract_manifest("mmg")
    views = [
        mammo("R", "CC", nodule=False, study_uid="1.2.826.0.1.3680043.8.498.9"),
        mammo("L", "CC", nodule=False, study_uid="1.2.826.0.1.3680043.8.498.9", instance_number=2),
        mammo("R", "MLO", nodule=True, study_uid="1.2.826.0.1.3680043.8.498.9", instance_number=3),
        mammo("L", "MLO", nodule=True, study_uid="1.2.826.0.1.3680043.8.498.9", instance_number=4),
    ]
    for ds in views[2:]:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MG_FOR_PROCESSING
        ds.PresentationIntentType = "FOR PROCESSING"
    sid = _study(store, spool, views)
    assert PipelineWorker(settings, store, StaticBundles([(m, TinyEngine())])).process(sid) == INFERRED
    state, detail = _state(store, sid)
    assert "AI not applied: tiny-mmg: 2 images" in detail
    (res,) = store.query("SELECT summary, study_score FROM results WHERE study_id=?", (sid,))
    summary = json.loads(res["summary"])
    accepted = {str(views[0].SOPInstanceUID), str(views[1].SOPInstanceUID)}
    refused = {str(views[2].SOPInstanceUID), str(views[3].SOPInstanceUID)}
    assert {f["image_sop_uid"] for f in summary["findings"]} == accepted
    assert {i["sop_instance_uid"] for i in summary["images"]} == accepted
    assert {n["image_sop_uid"] for n in summary["not_applied"]} == refused
    assert {n["category"] for n in summary["not_applied"]} == {"sop_class"}
    per_image = {f["image_sop_uid"]: f["score"] for f in summary["findings"]}
    assert res["study_score"] == pytest.approx(max(per_image.values()), abs=1e-6)
    assert summary["per_breast"] == {
        "R": pytest.approx(per_image[str(views[0].SOPInstanceUID)], abs=1e-6),
        "L": pytest.approx(per_image[str(views[1].SOPInstanceUID)], abs=1e-6),
    }
    import pydicom

    objects = store.query("SELECT kind, path FROM result_objects ORDER BY id")
    sr = pydicom.dcmread(settings.state_dir / next(o["path"] for o in objects if o["kind"] == "SR"))
    texts = [
        item.TextValue
        for item in sr.ContentSequence
        if item.ValueType == "CONTAINER"
        for item in item.get("ContentSequence", [])
        if item.ValueType == "TEXT"
    ]
    assert sorted(texts) == sorted(
        f"AI not applied to image {uid}: Digital Mammography X-Ray Image Storage - For Processing (SOP Class UID) "
        "not taken: model takes Digital Mammography X-Ray Image Storage - For Presentation, Breast Projection "
        "X-Ray Image Storage - For Presentation"
        for uid in refused
    )
    scs = [o for o in objects if o["kind"] == "SC"]
    assert len(scs) == 2  # none for a refused image
    referenced = {
        str(pydicom.dcmread(settings.state_dir / o["path"]).SourceImageSequence[0].ReferencedSOPInstanceUID)
        for o in scs
    }
    assert referenced == accepted


def test_sc_summary_line_names_the_refused_images() -> None:
    from appliance.pipeline.postprocess import ImageResult, StudyResult

    img = ImageResult("1.2", "1.3", MG_FOR_PRESENTATION, "L", "CC", [], 0.1)
    res = StudyResult("1", "b", "1.0.0", "mmg", True, [img], {"L": 0.1}, 0.1)
    assert "AI not applied" not in summary_line(img, res)
    res.not_applied = [{"image_sop_uid": "9", "image_series_uid": "8", "category": "age", "reason": "patient age"}] * 2
    assert not_applied_note(res) == "AI not applied to 2 other images: patient age"
    assert summary_line(img, res).endswith("; AI not applied to 2 other images: patient age")


def test_offline_infer_reports_not_analysed_and_writes_the_notice(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    ds = _screenshot_sc_labelled_cr_chest_pa()
    ds.save_as(src / "screenshot.dcm", enforce_file_format=True)
    out = tmp_path / "out"
    bundles = StaticBundles([(contract_manifest("cxr"), TinyEngine())])
    report = run_offline(Settings(state_dir=tmp_path / "home"), [src], out, bundles=bundles)
    (study,) = report["studies"]
    assert study["state"] == "not_analysed" and study["results"] == []
    assert study["reason"] == (
        f"AI not applied: tiny-cxr: image …{ds.SOPInstanceUID[-12:]}: Secondary Capture Image Storage (SOP Class "
        "UID) not taken: model takes Computed Radiography Image Storage, Digital X-Ray Image Storage - For "
        "Presentation"
    )
    (obj,) = study["objects"]
    assert obj["kind"] == "NOTICE" and Path(obj["path"]).exists()


def test_studies_and_study_show_name_the_state_and_the_reason(env, clean_env) -> None:
    """``appliance studies`` and ``study show`` say that AI did not run and why (never an empty "no findings")."""
    from typer.testing import CliRunner

    from appliance.cli import app

    settings, store, spool = env
    ds = chest()
    ds.PresentationIntentType = "FOR PROCESSING"
    sid = _study(store, spool, [ds])
    assert PipelineWorker(settings, store, StaticBundles([(contract_manifest("cxr"), TinyEngine())])).process(sid) == (
        NOT_ANALYSED
    )
    store.close()
    runner = CliRunner()
    reason = "For Processing image (Presentation Intent Type), model takes For Presentation"
    listed = runner.invoke(app, ["--home", str(settings.state_dir), "studies"], env={"COLUMNS": "400"})
    assert listed.exit_code == 0, listed.output
    assert "not_analysed" in listed.output and reason in listed.output
    shown = runner.invoke(app, ["--home", str(settings.state_dir), "study", "show", str(sid)], env={"COLUMNS": "400"})
    assert shown.exit_code == 0, shown.output
    assert f"not_analysed: AI not applied: tiny-cxr: image …{ds.SOPInstanceUID[-12:]}: {reason}" in shown.output


def test_dashboard_pages_and_metrics_show_not_analysed_and_refusals_by_category(home: Path) -> None:
    """The worklist and the study page name the state and the reason (never an empty "No findings"); the
    metrics count ``not_analysed`` studies and the refused images by category (a bounded label set)."""
    from prometheus_client.parser import text_string_to_metric_families

    from appliance.lifecycle import studies
    from appliance.lifecycle.studies import COMPLETE, RECEIVED
    from appliance.web.accounts import Role
    from tests.test_web import Box, file_instance

    box = Box(home)
    ds = chest()
    ds.BurnedInAnnotation = "YES"
    sid = file_instance(box.settings, box.store, ds)
    with box.store.transaction() as conn:
        studies.transition(conn, sid, RECEIVED, COMPLETE, "test: complete", completed=True)
    worker = PipelineWorker(box.settings, box.store, StaticBundles([(contract_manifest("cxr"), TinyEngine())]))
    assert worker.process(sid) == NOT_ANALYSED
    reason = "Burned In Annotation YES (text in the pixels): model takes images without it"
    c, _ = box.page_login(Role.VIEWER)
    page = c.get(f"/studies/{sid}").text
    assert 'id="study-state">not_analysed</span>' in page and reason in page
    assert "No findings" not in page and 'id="not-applied"' in page
    worklist = c.get("/worklist").text
    assert "not_analysed" in worklist and reason in worklist
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(box.client().get("/metrics").text)
        for s in fam.samples
    }
    assert samples[("appliance_studies_not_analysed_total", ())] == 1
    assert samples[("appliance_studies_no_model_total", ())] == 0
    refused = {dict(k[1])["category"]: v for k, v in samples.items() if k[0] == "appliance_model_refusals_total"}
    assert refused == {"burned_in_annotation": 1}


def test_a_bundle_that_refuses_a_study_another_analyses_is_named_in_the_detail(env) -> None:
    settings, store, spool = env
    adult = contract_manifest("cxr", min_age_years=60).model_copy(update={"bundle_id": "older-adults"})
    ds = chest()  # born 1970-01-01, studied 2024-01-02: 54 completed years
    sid = _study(store, spool, [ds])
    bundles = StaticBundles([(contract_manifest("cxr"), TinyEngine()), (adult, TinyEngine())])
    assert PipelineWorker(settings, store, bundles).process(sid) == INFERRED
    _, detail = _state(store, sid)
    assert detail.endswith(
        f"AI not applied: older-adults: image …{ds.SOPInstanceUID[-12:]}: patient age 54Y below the model's minimum"
        " 60Y (Patient's Birth Date and Study Date)"
    )
    assert [r["bundle_id"] for r in store.query("SELECT bundle_id FROM results WHERE study_id=?", (sid,))] == [
        "tiny-cxr"
    ]


def test_refused_images_of_a_mixed_study_are_named_per_image_in_detail_cli_and_page(home: Path) -> None:
    """In a mixed study each image the gate refused carries its own reason in ``study_detail`` (``not_applied``),
    in the images table of ``study show`` and in the study page's Images section, never a blank row that reads
    as "no findings"; the accepted images carry none."""
    from typer.testing import CliRunner

    from appliance.cli import app
    from appliance.lifecycle import studies
    from appliance.lifecycle.studies import COMPLETE, RECEIVED
    from appliance.web.accounts import Role
    from appliance.worklist.read import study_detail
    from tests.test_web import Box, file_instance

    box = Box(home)
    uid = "1.2.826.0.1.3680043.8.498.19"
    views = [
        mammo("R", "CC", nodule=False, study_uid=uid),
        mammo("L", "CC", nodule=False, study_uid=uid, instance_number=2),
        mammo("R", "MLO", nodule=True, study_uid=uid, instance_number=3),
        mammo("L", "MLO", nodule=True, study_uid=uid, instance_number=4),
    ]
    for ds in views[2:]:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MG_FOR_PROCESSING
        ds.PresentationIntentType = "FOR PROCESSING"
    sid = 0
    for ds in views:
        sid = file_instance(box.settings, box.store, ds)
    with box.store.transaction() as conn:
        studies.transition(conn, sid, RECEIVED, COMPLETE, "test: complete", completed=True)
    worker = PipelineWorker(box.settings, box.store, StaticBundles([(contract_manifest("mmg"), TinyEngine())]))
    assert worker.process(sid) == INFERRED
    reason = (
        "Digital Mammography X-Ray Image Storage - For Processing (SOP Class UID) not taken: model takes Digital "
        "Mammography X-Ray Image Storage - For Presentation, Breast Projection X-Ray Image Storage - For Presentation"
    )
    refused = {str(ds.SOPInstanceUID) for ds in views[2:]}
    rows = {img["sop_instance_uid"]: img for img in study_detail(box.store, sid).images}
    assert set(rows) == {str(ds.SOPInstanceUID) for ds in views}
    for sop, img in rows.items():
        if sop in refused:
            assert img["findings"] == [] and img["not_applied"] == [
                {"bundle_id": "tiny-mmg", "bundle_version": "1.0.0", "category": "sop_class", "reason": reason}
            ]
        else:
            assert img["findings"] and img["not_applied"] == []

    c, _ = box.page_login(Role.VIEWER)
    page = c.get(f"/studies/{sid}").text
    images = page[page.index("<h2>Images</h2>") :]
    for sop in refused:
        assert f"image …{sop[-12:]} · AI not applied (tiny-mmg): {reason}" in images
    box.store.close()
    shown = CliRunner().invoke(
        app, ["--home", str(box.settings.state_dir), "study", "show", str(sid)], env={"COLUMNS": "1000"}
    )
    assert shown.exit_code == 0, shown.output
    table = shown.output[shown.output.index("images") :]
    assert table.count(f"AI not applied (tiny-mmg): {reason}") == 2


def test_a_long_refusal_list_says_how_many_more_images(env) -> None:
    """Past ``EXPLAIN_SAMPLES`` image ids the detail says how many more there are, not a bare "…"."""
    from appliance.pipeline.router import EXPLAIN_SAMPLES

    settings, store, spool = env
    raw = [chest(instance_number=i + 1) for i in range(EXPLAIN_SAMPLES + 2)]
    for ds in raw:
        ds.PresentationIntentType = "FOR PROCESSING"
    sid = _study(store, spool, raw)
    assert PipelineWorker(settings, store, StaticBundles([(contract_manifest("cxr"), TinyEngine())])).process(sid) == (
        NOT_ANALYSED
    )
    _, detail = _state(store, sid)
    shown = ", ".join("…" + str(ds.SOPInstanceUID)[-12:] for ds in raw[:EXPLAIN_SAMPLES])
    assert detail.startswith(f"AI not applied: tiny-cxr: {len(raw)} images {shown} and 2 more: For Processing image")


def test_a_no_model_detail_that_states_an_age_stays_out_of_the_log(env) -> None:
    """A ``no_model`` detail (the local route rules exclude the bundle) can name a refused image's age; the study
    keeps it, the INFO log line carries only the refusal categories (ages over 89 identify, HIPAA Safe Harbor)."""
    import io

    from appliance.core import logs
    from appliance.core.config import RouteRule

    settings, store, spool = env
    m = contract_manifest("cxr", max_age_years=80)
    settings.pipeline.routes = [RouteRule(bundle_id=m.bundle_id, action="exclude", modalities=["DX"])]
    old, young = chest(instance_number=1), chest(instance_number=2)
    old.PatientAge = "095Y"
    sid = _study(store, spool, [old, young])
    buf = io.StringIO()
    logs.configure("INFO", "text", buf)
    try:
        state = PipelineWorker(settings, store, StaticBundles([(m, TinyEngine())])).process(sid)
    finally:
        logs.configure("INFO", "text")
    assert state == NO_MODEL
    detail = _state(store, sid)[1]
    assert "age 95Y above" in detail and "excluded by the local route rules" in detail  # the study says why
    out = buf.getvalue()
    assert "no model for study" in out and "categories" in out and "age" in out
    assert "95Y" not in out and "above the model" not in out
