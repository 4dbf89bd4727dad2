"""Urgent findings (triage): a manifest's ``urgent`` thresholds flag a study in the results summary, the
worklist, the SC banner and the SR, and put its cloud message ahead of the rest; the manifest format stays
backward compatible (a manifest without it keeps its exact canonical bytes and signature)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from pydicom import dcmread

from appliance.cloud import crypto, outbox
from appliance.cloud.overlay import CloudOverlay
from appliance.cloud.result_messages import CloudResultPublisher
from appliance.core.config import Settings
from appliance.core.store import Store
from appliance.lifecycle.studies import INFERRED
from appliance.pipeline.postprocess import Finding, ImageResult, StudyResult
from appliance.pipeline.results_sc import URGENT_YELLOW, layout
from appliance.pipeline.results_sr import PRIORITY, URGENT
from appliance.pipeline.worker import PipelineWorker, StaticBundles
from appliance.worklist.read import list_studies, study_detail
from engines import bundle as B
from engines.errors import BundleError
from engines.manifest import Manifest, canonical_bytes
from tests.test_worklist import chest, complete, file_instance
from testsupport.bundles import make_bundle, new_key, trust_for
from testsupport.common import ROOT
from testsupport.pipeline import TinyEngine, tiny_manifest


def urgent_manifest(threshold: float = 0.3) -> Manifest:
    doc = tiny_manifest().model_dump(mode="json")
    return Manifest.model_validate({**doc, "urgent": {"nodule": threshold}})


@pytest.fixture
def env(home: Path) -> tuple[Settings, Store]:
    settings = Settings(state_dir=home)
    return settings, Store(settings.db_path)


def analyse_with(settings: Settings, store: Store, manifest: Manifest, nodule: bool = True, publisher: Any = None):
    uid = chest().StudyInstanceUID
    sid = 0
    for ds in (chest(uid, nodule=nodule), chest(uid, nodule=False)):
        sid = file_instance(settings, store, ds)
    complete(store, sid)
    worker = PipelineWorker(settings, store, StaticBundles([(manifest, TinyEngine())]))
    if publisher is not None:
        worker.publisher = publisher
    assert worker.process(sid) == INFERRED
    return sid


# -- the manifest --------------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_manifest_without_urgent_keeps_its_canonical_bytes_and_signature() -> None:
    plain = tiny_manifest()
    assert b"urgent" not in canonical_bytes(plain)
    assert json.loads(canonical_bytes(Manifest.model_validate_json(canonical_bytes(plain)))) == json.loads(
        canonical_bytes(plain)
    )
    shipped = sorted((ROOT / "engines" / "reference" / "bundles").glob("*.bundle"))
    assert shipped
    for path in shipped:  # the reference bundles, signed before the field existed, read back byte for byte
        with tarfile.open(path) as tar:
            raw = tar.extractfile("manifest.json").read()  # type: ignore[union-attr]
        parsed = Manifest.model_validate_json(raw)
        assert parsed.urgent == {} and canonical_bytes(parsed) == raw
    flagged = urgent_manifest(0.8)
    assert json.loads(canonical_bytes(flagged))["urgent"] == {"nodule": 0.8}


@pytest.mark.unit
@pytest.mark.parametrize(
    ("urgent", "message"),
    [
        ({"effusion": 0.5}, "no scores output has"),
        ({"nodule": float("nan")}, "finite"),
        ({"nodule": "high"}, "valid number"),
    ],
)
def test_manifest_refuses_urgent_thresholds_that_mean_nothing(urgent: dict[str, Any], message: str) -> None:
    doc = tiny_manifest().model_dump(mode="json")
    with pytest.raises(ValidationError, match=message):
        Manifest.model_validate({**doc, "urgent": urgent})


@pytest.mark.unit
def test_a_signed_bundle_carries_its_urgent_thresholds_under_its_signature(tmp_path: Path) -> None:
    key = new_key()
    path = make_bundle(tmp_path, key, urgent={"a": 0.9})
    assert B.verify_bundle(path, trust_for(key)).manifest.urgent == {"a": 0.9}
    with tarfile.open(path) as tar:
        members = {i.name: tar.extractfile(i).read() for i in tar.getmembers()}  # type: ignore[union-attr]
    doc = json.loads(members["manifest.json"])
    doc["urgent"] = {"a": 0.1}  # lowered after signing: the signature no longer covers it
    tampered = tmp_path / "tampered.bundle"
    with tarfile.open(tampered, "w:gz") as tar:
        for name, data in members.items():
            if name == "manifest.json":
                data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(BundleError) as refused:
        B.verify_bundle(tampered, trust_for(key))
    assert refused.value.reason == "bad_signature"


# -- the pipeline --------------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_a_finding_at_the_urgent_threshold_flags_summary_worklist_sc_and_sr(env) -> None:
    settings, store = env
    sid = analyse_with(settings, store, urgent_manifest())
    summary = json.loads(store.query("SELECT summary FROM results WHERE study_id=?", (sid,))[0]["summary"])
    assert summary["urgent"] == ["nodule"]
    flags = sorted((f["positive"], f["urgent"], f["urgent_threshold"]) for f in summary["findings"])
    assert flags == [(False, False, 0.3), (True, True, 0.3)]  # the image without a nodule is not urgent

    (s,) = list_studies(store)
    assert s.urgent and s.findings[0]["urgent"] and [x.id for x in list_studies(store, urgent_only=True)] == [sid]
    assert study_detail(store, sid).results[0]["urgent"] == ["nodule"]

    objects = store.query("SELECT kind, path FROM result_objects ORDER BY id")
    sr = dcmread(settings.state_dir / next(o["path"] for o in objects if o["kind"] == "SR"))  # stored relative
    evaluations = [
        (item.ConceptNameCodeSequence[0].CodeValue, item.ConceptCodeSequence[0].CodeValue)
        for group in sr.ContentSequence
        if "ContentSequence" in group
        for sub in group.ContentSequence
        if "ContentSequence" in sub
        for item in sub.ContentSequence
        if item.ValueType == "CODE" and "ConceptCodeSequence" in item
    ]
    urgent_flags = [e for e in evaluations if e == (PRIORITY.value, URGENT.value)]
    assert len(urgent_flags) == 2  # the urgent finding's group and the study group
    for sc_path in (o["path"] for o in objects if o["kind"] == "SC"):
        pixels = dcmread(settings.state_dir / sc_path).pixel_array
        assert tuple(pixels[1, 1]) == URGENT_YELLOW  # the banner across the top of every SC of the study


@pytest.mark.unit
def test_sc_banner_names_the_urgent_labels_above_everything_else() -> None:
    def finding(label: str, score: float, urgent: bool) -> Finding:
        return Finding(label, score, 0.3, score >= 0.3, urgent=urgent, urgent_threshold=0.5 if urgent else None)

    img = ImageResult("1.2.3", "1.2", "1.2.840.10008.5.1.4.1.1.1.1", None, "PA", [finding("nodule", 0.1, False)], 0.1)
    other = ImageResult(
        "1.2.4", "1.2", "1.2.840.10008.5.1.4.1.1.1.1", None, "PA", [finding("effusion", 0.9, True)], 0.9
    )
    result = StudyResult("1.2", "tiny-cxr", "1.0.0", "cxr", False, [img, other], None, 0.9)
    assert result.urgent_labels == ["effusion"]
    boxes = layout((600, 500), None, img, result, [], "PA")  # the image without the urgent finding: banner too
    urgent, notice = boxes[0], boxes[1]
    assert (urgent.kind, urgent.text, urgent.bg, urgent.box[:2]) == (
        "banner",
        "URGENT: effusion",
        URGENT_YELLOW,
        (0, 0),
    )
    assert notice.text == "NOT FOR CLINICAL USE" and notice.box[1] == urgent.box[3]
    summary = next(b for b in boxes if b.kind == "summary")
    assert summary.text == "URGENT: effusion; AI: nodule 0.10; NOT FOR CLINICAL USE"
    calm = StudyResult("1.2", "tiny-cxr", "1.0.0", "cxr", True, [img], None, 0.1)
    assert all(b.kind != "banner" for b in layout((600, 500), None, img, calm, [], "PA"))


@pytest.mark.unit
def test_below_the_urgent_threshold_nothing_is_flagged(env) -> None:
    settings, store = env
    sid = analyse_with(settings, store, urgent_manifest(threshold=1e9))
    summary = json.loads(store.query("SELECT summary FROM results WHERE study_id=?", (sid,))[0]["summary"])
    assert summary["urgent"] == [] and not any(f["urgent"] for f in summary["findings"])
    assert not list_studies(store)[0].urgent and list_studies(store, urgent_only=True) == []


@pytest.mark.unit
def test_urgent_results_leave_the_outbox_first(env) -> None:
    settings, store = env
    _, pub = crypto.generate_keypair()
    settings.cloud.recipient_keys = {"central-1": pub}
    publisher = CloudResultPublisher(settings, CloudOverlay(settings.cloud, store))
    routine = analyse_with(settings, store, tiny_manifest(), publisher=publisher)
    urgent = analyse_with(settings, store, urgent_manifest(), publisher=publisher)
    with store.transaction() as conn:
        order = [r.priority for r in outbox.peek(conn, 10)]
    assert order == [outbox.URGENT_RESULT_PRIORITY, outbox.PRIORITY["result"]]  # queued second, sent first
    for sid in (routine, urgent):
        s = study_detail(store, sid)
        assert s.summary.pseudonym and s.summary.pseudonym.startswith("2.25.")
        assert s.summary.pseudonym != s.summary.study_uid
        assert [t["what"] for t in s.timeline].count("cloud queued") == 1


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_urgent_sr_and_sc_pass_dciodvfy(env) -> None:
    settings, store = env
    analyse_with(settings, store, urgent_manifest())
    paths = [str(settings.state_dir / r["path"]) for r in store.query("SELECT path FROM result_objects")]
    assert len(paths) == 3
    for path in paths:
        out = subprocess.run(["dciodvfy", path], capture_output=True, text=True, timeout=60)
        errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], path
