"""Bundle statistics from studies run through the real pipeline worker (ONNX Runtime, tiny model): the counts
agree with the stored results (computed here from the summaries with numpy, not with the stats code), refusals
are counted by category, a re-run adds nothing, ``/metrics`` exposes them as Prometheus histograms, and drift
against a reference is flagged for a shifted site (contrast change, another manufacturer) and not for an
unshifted one, as a status PROBLEM too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset

from appliance.app import readiness
from appliance.cloud import crypto, payload
from appliance.core.config import Settings
from appliance.core.store import Store
from appliance.lifecycle import studies
from appliance.lifecycle.studies import INFERRED, NO_MODEL
from appliance.models import stats
from appliance.pipeline.analyse import analyse
from appliance.pipeline.observe import input_summary
from appliance.pipeline.worker import PipelineWorker, StaticBundles
from appliance.web.metrics import ApplianceMetrics
from engines import drift
from engines.manifest import Manifest
from engines.reference.phantoms import PatientInfo, chest_phantom, synthetic_uid, to_dicom
from tests.test_worklist import complete, file_instance
from testsupport.pipeline import TinyEngine, tiny_manifest

pytestmark = pytest.mark.unit
EDGES = np.linspace(0.0, 1.0, 21)  # the stats/v1 bins, written out independently of engines.drift


@pytest.fixture
def env(home: Path) -> tuple[Settings, Store]:
    settings = Settings(state_dir=home)
    return settings, Store(settings.db_path)


def phantom(seed: int, *, shifted: bool = False, modality: str = "DX", rows: int = 320, cols: int = 256) -> Dataset:
    """A one-image chest phantom study; ``shifted``: the site changed equipment (another manufacturer and model)
    and its images come out with much less contrast (a new processing protocol: compressed pixel values and a
    wider VOI window)."""
    ph = chest_phantom(rows, cols, seed=seed, nodules=seed % 3)
    pixels = 0.55 + 0.25 * ph.pixels if shifted else ph.pixels
    ds = to_dicom(pixels, modality=modality, patient=PatientInfo(patient_id=f"P{seed}", accession=f"A{seed}"))
    ds.StudyInstanceUID = synthetic_uid("stats-study", seed, shifted, rows)
    ds.SOPInstanceUID = synthetic_uid("stats-sop", seed, shifted, rows)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if shifted:  # the new unit's processing also sets a wider default window: flatter images on screen and in
        ds.Manufacturer, ds.ManufacturerModelName = "OtherVendor", "DR-9000"
        ds.WindowWidth = f"{float(ds.WindowWidth) * 3:.1f}"  # the model's input (window = "dicom")
    return ds


def run_study(settings: Settings, store: Store, manifest: Manifest, images: list[Dataset]) -> tuple[int, str]:
    sid = 0
    for ds in images:
        sid = file_instance(settings, store, ds)
    complete(store, sid)
    state = PipelineWorker(settings, store, StaticBundles([(manifest, TinyEngine())])).process(sid)
    return sid, state


def summaries(store: Store) -> list[dict[str, Any]]:
    return [json.loads(r["summary"]) for r in store.query("SELECT summary FROM results ORDER BY id")]


def test_stats_count_what_the_results_say(env) -> None:
    settings, store = env
    m = tiny_manifest()
    for seed in range(6):
        assert run_study(settings, store, m, [phantom(seed)])[1] == INFERRED
    # a two-image study whose second image is too small for the pipeline: analysed, one refusal ("size")
    two = [phantom(10), phantom(11, rows=8, cols=8)]
    two[1].StudyInstanceUID = two[0].StudyInstanceUID
    sid, state = run_study(settings, store, m, two)
    assert state == INFERRED
    # a study no bundle takes (CT): no_model, each image counted as a "modality" refusal of the active bundle
    assert run_study(settings, store, m, [phantom(20, modality="CR")])[1] == INFERRED
    ct = phantom(21)
    ct.Modality = "MG"
    assert run_study(settings, store, m, [ct])[1] == NO_MODEL

    got = stats.counts(store.conn, m.bundle_id, m.version, [stats.utc_day()])
    done = summaries(store)
    scores = [f["score"] for s in done for f in s["findings"] if f["label"] == "nodule"]
    assert got["studies"] == len(done) == 8 and got["images"] == len(scores) == 8
    assert got["scores"]["nodule"] == np.histogram(np.clip(scores, 0, 1), bins=EDGES)[0].tolist()
    study_scores = [s["study_score"] for s in done]
    assert got["study_score"] == np.histogram(study_scores, bins=EDGES)[0].tolist()
    assert got["positives"]["nodule"] == sum(f["positive"] for s in done for f in s["findings"]) > 0
    assert got["refusals"] == {"size": 1, "modality": 1}
    assert got["inputs"]["manufacturer_model"] == {"Phantom Imaging (synthetic)|unknown": 8}
    assert got["inputs"]["photometric"] == {"MONOCHROME2": 8} and got["inputs"]["bits_stored"] == {"12": 8}
    assert got["inputs"]["size_band"] == {"<=1024": 8}
    assert got["inputs"]["transfer_syntax"] == {"1.2.840.10008.1.2.1": 8}
    assert sum(got["input_mean"]) == sum(got["input_p95"]) == 8

    # an operator's retry of an analysed study: the same revision is not counted twice
    with store.transaction() as conn:
        studies.reopen(conn, sid, "test: retry")
    assert PipelineWorker(settings, store, StaticBundles([(m, TinyEngine())])).process(sid) == INFERRED
    again = stats.counts(store.conn, m.bundle_id, m.version, [stats.utc_day()])
    assert again["studies"] == 8 and again["scores"] == got["scores"]

    # /metrics: Prometheus histograms and counters with the same numbers, parsed by prometheus_client itself
    metrics = ApplianceMetrics()
    metrics.bind(settings, store, lambda: None, lambda: {"bundles_active": []})
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
    score = families["appliance_model_score"]
    labels = {"bundle": m.bundle_id, "version": m.version, "label": "nodule"}
    buckets = {
        s.labels["le"]: s.value
        for s in score.samples
        if s.name.endswith("_bucket") and s.labels.items() >= labels.items()
    }
    assert buckets["+Inf"] == 8 and buckets["0.5"] == sum(got["scores"]["nodule"][:10])
    total = next(s.value for s in score.samples if s.name.endswith("_sum") and s.labels == labels)
    assert total == pytest.approx(sum(scores), abs=1e-4)
    studies_total = families["appliance_model_studies"].samples[0]
    assert studies_total.name == "appliance_model_studies_total" and studies_total.value == 8
    refused = {s.labels["category"]: s.value for s in families["appliance_model_refusals"].samples}
    assert refused == {"size": 1.0, "modality": 1.0}


def test_a_stats_message_is_strict_json_encrypted_and_refuses_nan(env) -> None:
    settings, store = env
    m = tiny_manifest()
    run_study(settings, store, m, [phantom(1)])
    doc = stats.snapshot(store.conn, m.bundle_id, m.version, stats.utc_day(), final=False)
    priv, pub = crypto.generate_keypair()
    mid, body = payload.build_stats_message(doc, settings, b"k" * 32, recipient_keys={"c": pub})
    meta, plain = crypto.decrypt(body, {"c": priv})
    assert meta["type"] == "stats" and meta["schema"] == "stats/v1" and meta["mid"] == mid
    back = json.loads(plain, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert back == doc and back["studies"] == 1 and len(back["score_edges"]) == 21
    again, _ = payload.build_stats_message(
        {**doc, "generated_at": "2030-01-01T00:00:00Z"}, settings, b"k" * 32, recipient_keys={"c": pub}
    )
    assert again != mid  # each snapshot is its own message
    for bad in (
        {**doc, "drift": {"x": {"psi": float("nan")}}},
        {**doc, "studies": -1},
        {**doc, "images": 1.5},
        {**doc, "scores": {"nodule": [float("inf")] * 20}},
    ):
        with pytest.raises(ValueError):
            payload.build_stats_message(bad, settings, b"k" * 32, recipient_keys={"c": pub})


def _reference(manifest: Manifest, seeds: range) -> dict[str, Any]:
    """The validation-set reference of the tiny model on unshifted phantoms, built as a central team would:
    analyse, then ``engines.drift.reference_distributions``."""
    images = [phantom(s) for s in seeds]
    engine = TinyEngine()
    scores, study_scores, means, p95s = [], [], [], []
    for ds in images:
        a = analyse([ds], manifest, engine.infer, 8, 10**8)
        scores += [f.score for img in a.result.images for f in img.findings]
        study_scores.append(a.result.study_score)
        for prep in a.prepared:
            mean, p95 = input_summary(prep, manifest.input.preprocessing)
            means.append(mean)
            p95s.append(p95)
    return drift.reference_distributions({"nodule": scores}, study_scores, means, p95s)


def test_drift_is_flagged_for_a_shifted_site_and_not_for_an_unshifted_one(home: Path, tmp_path: Path) -> None:
    base = tiny_manifest()
    doc = base.model_dump(mode="json")
    ref = _reference(base, range(100, 140))
    m = Manifest.model_validate({**doc, "reference": ref, "drift": {"min_studies": 10, "window_days": 7}})

    results: dict[str, dict[str, Any]] = {}
    for site, shifted in (("steady", False), ("shifted", True)):
        settings = Settings(state_dir=tmp_path / site)
        store = Store(settings.db_path)
        for seed in range(200, 209):  # 9 studies: below min_studies, nothing is judged yet
            run_study(settings, store, m, [phantom(seed, shifted=shifted)])
        assert stats.drift_report(store.conn) == {}
        for seed in range(209, 215):
            run_study(settings, store, m, [phantom(seed, shifted=shifted)])
        results[site] = stats.drift_report(store.conn)[f"{m.bundle_id}@{m.version}"]
        problem = readiness.model_drift(settings, store.conn)
        if shifted:
            assert problem is not None and problem.key == "models.drift" and not problem.blocking
            assert "input_p95" in problem.message and "tiny-cxr@1.0.0" in problem.message
            inputs = stats.counts(store.conn, m.bundle_id, m.version, [stats.utc_day()])["inputs"]
            assert inputs["manufacturer_model"] == {"OtherVendor|DR-9000": 15}
        else:
            assert problem is None
    steady, shifted_ = results["steady"], results["shifted"]
    assert steady["studies"] == shifted_["studies"] == 15
    assert not steady["alert"], steady
    assert not any(x["alert"] for x in steady["metrics"].values())
    # the flatter images: their 95th percentile falls far below the reference's (and the model's scores move)
    assert shifted_["alert"] and shifted_["metrics"]["input_p95"]["alert"], shifted_
    assert shifted_["metrics"]["input_p95"]["psi"] > 1.0 > steady["metrics"]["input_p95"]["psi"]
    assert shifted_["metrics"]["input_p95"]["p_value"] < 0.01 < steady["metrics"]["input_p95"]["p_value"]


def test_the_stats_loop_queues_each_ended_day_once_as_final(home: Path) -> None:
    from appliance.cloud import outbox
    from appliance.cloud.overlay import CloudOverlay
    from appliance.cloud.stats_messages import StatsService

    priv, pub = crypto.generate_keypair()
    settings = Settings(state_dir=home, cloud={"recipient_keys": {"c": pub}, "device_id": "box-1"})
    store = Store(settings.db_path)
    m = tiny_manifest()
    obs = stats.StudyObservation(m.bundle_id, m.version, 0.7, {"nodule": [0.7]}, {"nodule": 1}, [0.4], [0.9])
    with store.transaction() as conn:
        stats.record_study(conn, obs, day="2020-02-28")
        stats.record_study(conn, obs, day="2020-02-29")
        stats.record_study(conn, obs, day=stats.utc_day())  # today: not final yet
        stats.record_refusal(conn, m.bundle_id, m.version, "burned_in_annotation", day="2020-02-29")
        stats.record_refusal(conn, m.bundle_id, m.version, "made-up", day="2020-02-29")
        stats.record_not_analysed(conn, m.bundle_id, m.version, day="2020-02-29")
    drift_changes: list[int] = []
    service = StatsService(
        settings,
        store,
        lambda: [m],
        CloudOverlay(settings.cloud, store),
        on_drift_change=lambda: drift_changes.append(1),
    )
    service.step()
    service.step()  # a second pass queues nothing more
    rows = store.query("SELECT message_id, body FROM outbox WHERE kind='stats' ORDER BY seq")
    docs = [json.loads(crypto.decrypt(bytes(r["body"]), {"c": priv})[1]) for r in rows]
    assert [(d["day"], d["final"]) for d in docs] == [("2020-02-28", True), ("2020-02-29", True)]
    assert docs[1]["refusals"] == {"burned_in_annotation": 1, "other": 1} and docs[1]["not_analysed"] == 1
    assert docs[1]["scores"]["nodule"][14] == 1 and docs[1]["input_p95"][18] == 1  # 0.7 -> bin 14, 0.9 -> bin 18
    assert drift_changes == [1]  # the first pass reports the (empty) drift state once, then only changes
    status, body = service.send_stats_method({"day": "2020-02-29"})
    assert status == 200 and body["queued"][0]["final"] is True
    assert outbox.counts_by_kind(store.conn)["stats"] == 3
    assert service.send_stats_method({"day": "2999-01-01"})[0] == 400
