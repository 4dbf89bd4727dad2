"""The inference worker on the state store: FIFO, routing, no_model, not_processable, failure, timeout, resume."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from appliance.core.config import RouteRule, Settings
from appliance.core.store import Store, now
from appliance.lifecycle.studies import COMPLETE, FAILED, INFERRED, INFERRING, NO_MODEL, NOT_PROCESSABLE
from appliance.pipeline.worker import PipelineWorker, StaticBundles
from testsupport.pipeline import TinyEngine, make_dataset, save, synthetic_image, tiny_manifest


def add_spooled_study(store: Store, spool: Path, datasets, state: str = COMPLETE, completed_at=None) -> int:
    """Record a study and its instances as the ingest side does (files in the spool, rows in the DB)."""
    ts = now()
    study_uid = str(datasets[0].StudyInstanceUID)
    with store.transaction() as conn:
        study_id = conn.execute(
            "INSERT INTO studies(study_uid, state, modality, created_at, updated_at, last_instance_at, completed_at)"
            " VALUES (?,?,?,?,?,?,?)",
            (study_uid, state, str(datasets[0].get("Modality", "")), ts, ts, ts, completed_at or ts),
        ).lastrowid
        for ds in datasets:
            path = save(ds, spool / study_uid / f"{ds.SOPInstanceUID}.dcm")
            conn.execute(
                "INSERT INTO instances(study_id, study_uid, series_uid, sop_instance_uid, sop_class_uid,"
                " transfer_syntax, modality, path, size, sha256, received_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    study_id,
                    study_uid,
                    str(ds.get("SeriesInstanceUID", "")),
                    str(ds.SOPInstanceUID),
                    str(ds.SOPClassUID),
                    str(ds.file_meta.TransferSyntaxUID),
                    str(ds.get("Modality", "")),
                    str(path),
                    path.stat().st_size,
                    str(ds.SOPInstanceUID),
                    ts,
                ),
            )
    return int(study_id)


def _state(store: Store, study_id: int) -> tuple[str, str | None]:
    r = store.query("SELECT state, detail FROM studies WHERE id=?", (study_id,))[0]
    return r["state"], r["detail"]


@pytest.fixture
def env(home: Path):
    settings = Settings(state_dir=home)
    settings.pipeline.poll_s = 0.1
    store = Store(settings.db_path)
    return settings, store, home / "spool"


def _chest(**kw):
    return make_dataset(synthetic_image(300, 240, (100, 120), radius=10), **kw)


def test_studies_processed_fifo_with_one_batch(env) -> None:
    settings, store, spool = env
    engine = TinyEngine(max_batch=8)
    order = []
    engine_infer = engine.infer
    engine.infer = lambda x: (order.append(x["image"].shape[0]), engine_infer(x))[1]
    t = now()
    second = add_spooled_study(store, spool, [_chest()], completed_at=t + 1)
    study = pydicom.uid.generate_uid()
    first = add_spooled_study(store, spool, [_chest(study_uid=study) for _ in range(3)], completed_at=t)
    worker = PipelineWorker(settings, store, StaticBundles([(tiny_manifest(), engine)]))
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and {_state(store, s)[0] for s in (first, second)} != {INFERRED}:
            time.sleep(0.05)
    finally:
        worker.stop()
    assert _state(store, first)[0] == INFERRED and _state(store, second)[0] == INFERRED
    assert order == [3, 1]  # the earlier-completed study first, its 3 images in one batch
    summary = json.loads(store.query("SELECT summary FROM results WHERE study_id=?", (first,))[0]["summary"])
    assert summary["study_uid"] == study and len(summary["findings"]) == 3
    assert summary["patient"]["PatientID"] == "P123" and summary["bundle_version"] == "1.0.0"
    kinds = [r["kind"] for r in store.query("SELECT kind FROM result_objects ORDER BY id")]
    assert kinds.count("SR") == 2 and kinds.count("SC") == 4
    stored = [r["path"] for r in store.query("SELECT path FROM result_objects")]
    assert all(not Path(p).is_absolute() and (settings.state_dir / p).exists() for p in stored)


def test_no_matching_model_is_recorded_not_an_error(env) -> None:
    settings, store, spool = env
    sid = add_spooled_study(store, spool, [_chest(modality="CT")])
    worker = PipelineWorker(settings, store, StaticBundles([(tiny_manifest(), TinyEngine())]))
    assert worker.process(sid) == NO_MODEL
    assert "CT" in _state(store, sid)[1]


def test_route_rule_can_exclude_a_bundle(env) -> None:
    settings, store, spool = env
    settings.pipeline.routes = [RouteRule(bundle_id="tiny-cxr", action="exclude", modalities=["DX"])]
    sid = add_spooled_study(store, spool, [_chest()])
    assert PipelineWorker(settings, store, StaticBundles([(tiny_manifest(), TinyEngine())])).process(sid) == NO_MODEL


def test_rgb_and_tiny_images_make_the_study_not_processable(env) -> None:
    settings, store, spool = env
    rgb = pydicom.dcmread(get_testdata_file("SC_rgb_rle.dcm", download=False))
    rgb.Modality = "DX"
    tiny = make_dataset(np.ones((1, 1), dtype=np.uint16), study_uid=rgb.StudyInstanceUID)
    sid = add_spooled_study(store, spool, [rgb, tiny])
    worker = PipelineWorker(settings, store, StaticBundles([(tiny_manifest(), TinyEngine())]))
    assert worker.process(sid) == NOT_PROCESSABLE
    detail = _state(store, sid)[1]
    assert "colour image" in detail and "too small" in detail


def test_decompression_bomb_study_is_not_processable(env) -> None:
    settings, store, spool = env
    settings.pipeline.max_pixels = 1_000_000
    ds = make_dataset(synthetic_image(64, 64, None))
    ds.Rows = ds.Columns = 30000  # declared size; the bytes do not match and must never be decoded
    sid = add_spooled_study(store, spool, [ds])
    worker = PipelineWorker(settings, store, StaticBundles([(tiny_manifest(), TinyEngine())]))
    assert worker.process(sid) == NOT_PROCESSABLE
    assert "refused before decoding" in _state(store, sid)[1]


class _Broken:
    max_batch = 4

    def infer(self, inputs):
        raise RuntimeError("CUDA error: device lost")


class _Slow(TinyEngine):
    def infer(self, inputs):
        time.sleep(3)
        return super().infer(inputs)


def test_failure_and_timeout_mark_failed_and_move_on(env) -> None:
    settings, store, spool = env
    settings.pipeline.inference_timeout_s = 0.5
    a = add_spooled_study(store, spool, [_chest()])
    assert PipelineWorker(settings, store, StaticBundles([(tiny_manifest(), _Broken())])).process(a) == FAILED
    assert "device lost" in _state(store, a)[1]
    b = add_spooled_study(store, spool, [_chest()])
    c = add_spooled_study(store, spool, [_chest()])
    slow = PipelineWorker(settings, store, StaticBundles([(tiny_manifest(), _Slow())]))
    t0 = time.monotonic()
    assert slow.process(b) == FAILED
    assert time.monotonic() - t0 < 2.5
    assert "timed out" in _state(store, b)[1]
    slow.bundles = StaticBundles([(tiny_manifest(), TinyEngine())])
    assert slow.process(c) == INFERRED


def test_interrupted_study_is_reprocessed_on_restart(env) -> None:
    settings, store, spool = env
    sid = add_spooled_study(store, spool, [_chest()], state=INFERRING)
    worker = PipelineWorker(settings, store, StaticBundles([(tiny_manifest(), TinyEngine())]))
    assert worker.resume() == 1
    assert _state(store, sid)[0] == COMPLETE
    assert worker.process(sid) == INFERRED
