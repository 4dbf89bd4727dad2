"""Early preparation: the receiver's per-instance hook, the prepared-image cache, and the worker using it.

Real parts: the StorageSCP in-process on an ephemeral port, dcmtk storescu as the modality, the REAL reference
bundles (cxr-phantom, mmg-phantom) on ONNX Runtime, reference phantoms (J2K, MONOCHROME1, 4-view mammogram).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from appliance.core.config import Settings
from appliance.core.store import Store
from appliance.ingest.assembler import StudyAssembler
from appliance.ingest.scp import StorageSCP, StoredInstance
from appliance.ingest.spool import Spool
from appliance.lifecycle.studies import COMPLETE, INFERRED
from appliance.models.active import ActiveEngines
from appliance.pipeline.analyse import analyse_route
from appliance.pipeline.prepare_early import EarlyPreparer, PreparedCache, cache_key, prepared_bytes
from appliance.pipeline.preprocess import Prepared, prepare
from appliance.pipeline.results import build_objects
from appliance.pipeline.router import route
from appliance.pipeline.worker import PipelineWorker, load_instances
from engines.reference.phantoms import chest_study, mammo_study
from testsupport.dcmtk import storescu
from testsupport.reference import trust_reference_bundles


@pytest.fixture
def box(home: Path):
    """Receiver (in-process, ephemeral port) + early preparer + the real reference bundles."""
    settings = trust_reference_bundles(Settings(state_dir=home))
    settings.engines.backend = "ort"
    settings.dicom.port = 0
    settings.dicom.min_free_bytes = 0
    settings.dicom.quiet_seconds = 0.2
    store = Store(settings.db_path)
    engines = ActiveEngines(settings, install_reference=True)
    engines.active()
    assembler = StudyAssembler(store, settings.dicom.quiet_seconds)
    scp = StorageSCP(settings.dicom, store, Spool(settings.spool_dir), assembler)
    cache = PreparedCache(settings.pipeline.early_cache_mb * 2**20)
    preparer = EarlyPreparer(settings, engines, cache, lambda: scp.active_associations() > 0)
    scp.on_instance.append(preparer.submit)
    for s in (scp, assembler, preparer):
        s.start()
    try:
        yield settings, store, scp, engines, cache, preparer
    finally:
        for s in (preparer, assembler, scp):
            s.stop()
        store.close()


def _send_and_wait(settings, store, scp, preparer, files: list[str], n_entries: int) -> int:
    r = storescu(scp.address[1], files, "-xv")
    assert r.stdout.count("Success") == len(files), r.stdout[-800:]
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        row = store.query("SELECT id, state FROM studies WHERE study_uid=?", (uid,))
        if row and row[0]["state"] == COMPLETE and preparer.queue.empty() and len(preparer.cache) >= n_entries:
            return int(row[0]["id"])
        time.sleep(0.05)
    raise AssertionError(f"study not complete / not prepared: {row}, cached {len(preparer.cache)}")


def _same_prepared(a: Prepared, b: Prepared) -> None:
    assert a.tensor.dtype == b.tensor.dtype and a.tensor.tobytes() == b.tensor.tobytes()
    assert a.display.dtype == b.display.dtype and a.display.tobytes() == b.display.tobytes()
    assert a.transform == b.transform and a.pixel_spacing == b.pixel_spacing and a.display_factor == b.display_factor


TIMES = {
    "InstanceCreationDate",
    "InstanceCreationTime",
    "ContentDate",
    "ContentTime",
    "DateOfSecondaryCapture",
    "TimeOfSecondaryCapture",
    "ContributionDateTime",
}


def _without_times(ds: pydicom.Dataset) -> bytes:
    """The object's bytes with the clock readings of its build blanked (the only thing two builds differ in)."""
    ds = copy.deepcopy(ds)

    def blank(d: pydicom.Dataset, elem: pydicom.DataElement) -> None:
        if elem.keyword in TIMES:
            elem.value = ""

    ds.walk(blank)
    with io.BytesIO() as fh:
        ds.save_as(fh, enforce_file_format=True)
        return fh.getvalue()


@pytest.mark.integration
def test_cached_and_uncached_paths_identical(box, tmp_path: Path) -> None:
    settings, store, scp, engines, cache, preparer = box
    studies = [
        chest_study(tmp_path, seed=3, transfer_syntax="j2k-lossless", photometric="MONOCHROME1"),
        chest_study(tmp_path, seed=4, size=(400, 300), pixel_spacing=(0.2, 0.1)),
        mammo_study(tmp_path, seed=5, masses={"L": 1}, transfer_syntax="j2k-lossless"),
    ]
    for study in studies:
        files = study["files"]
        sid = _send_and_wait(settings, store, scp, preparer, files, 0)
        images, shas, problems = load_instances(store, sid, settings.spool_dir)
        assert not problems and len(images) == len(files)
        for ds, sha in zip(images, shas, strict=True):  # the receiver's sha256 is that of the spooled bytes
            assert sha == hashlib.sha256(Path(ds.filename).read_bytes()).hexdigest()
        (r,) = route(engines.active(), images, [], None)
        deadline = time.monotonic() + 30
        while not all(cache_key(s, r.manifest) in cache for s in shas) and time.monotonic() < deadline:
            time.sleep(0.05)
        worker = PipelineWorker(settings, store, engines, prepared=cache)
        hits: list[int] = []
        cached = analyse_route(r, settings.pipeline, worker.cached_lookup(r.manifest, images, shas, hits))
        assert len(hits) == len(images)  # every image came from the cache
        plain = analyse_route(r, settings.pipeline)
        for a, b in zip(cached.prepared, plain.prepared, strict=True):
            assert a is not b
            _same_prepared(a, b)
        assert cached.result.summary() == plain.result.summary()
        objs_c = build_objects(cached, r.manifest, settings.pipeline.sc_max_size)
        objs_p = build_objects(plain, r.manifest, settings.pipeline.sc_max_size)
        assert [k for k, _ in objs_c] == ["SR", *["SC"] * len(images)]
        for (_, a), (_, b) in zip(objs_c, objs_p, strict=True):
            assert _without_times(a) == _without_times(b)


@pytest.mark.integration
def test_worker_takes_prepared_images_from_the_cache(box, tmp_path: Path) -> None:
    settings, store, scp, engines, cache, preparer = box
    study = mammo_study(tmp_path, seed=9, masses={"R": 1}, transfer_syntax="j2k-lossless")
    sid = _send_and_wait(settings, store, scp, preparer, study["files"], 4)
    worker = PipelineWorker(settings, store, engines, prepared=cache)
    assert worker.process(sid) == INFERRED
    timings = json.loads(store.query("SELECT timings FROM results WHERE study_id=?", (sid,))[0]["timings"])
    assert timings["early_prepared"] == 4.0
    summary = json.loads(store.query("SELECT summary FROM results WHERE study_id=?", (sid,))[0]["summary"])
    assert summary["per_breast"]["R"] > summary["per_breast"]["L"]


@pytest.mark.integration
def test_receiver_hook_gets_durable_instances_and_a_failing_hook_is_ignored(box, tmp_path: Path) -> None:
    settings, store, scp, engines, cache, preparer = box
    seen: list[StoredInstance] = []

    def broken(_inst: StoredInstance) -> None:
        raise RuntimeError("hook bug")

    scp.on_instance[:0] = [broken]
    scp.on_instance.append(seen.append)
    study = chest_study(tmp_path, seed=11)
    files = study["files"] + [str(_resave(Path(study["files"][0]), tmp_path / "dup.dcm"))]
    r = storescu(scp.address[1], files, "-xv")
    assert r.stdout.count("Success") == 2, r.stdout[-800:]  # the broken hook failed nothing
    assert len(seen) == 1  # the duplicate (same bytes) is not announced again
    inst = seen[0]
    row = store.query("SELECT study_id, sha256, path FROM instances")[0]
    assert inst.path.is_absolute() and inst.path.exists()
    assert inst.sha256 == row["sha256"] == hashlib.sha256(inst.path.read_bytes()).hexdigest()
    assert inst.study_id == row["study_id"] and inst.header.modality == "DX"
    assert inst.header.sop_instance_uid == pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID


def _resave(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


# -- the cache: keys, staleness, memory ---------------------------------------------------------------------


@pytest.fixture
def chest(tmp_path: Path, home: Path):
    settings = trust_reference_bundles(Settings(state_dir=home))
    settings.engines.backend = "ort"
    engines = ActiveEngines(settings, install_reference=True)
    manifest = next(m for m, _ in engines.active() if m.bundle_id == "cxr-phantom")
    path = Path(chest_study(tmp_path, seed=21, transfer_syntax="j2k-lossless")["files"][0])
    return settings, engines, manifest, path


def _poison(prep: Prepared) -> Prepared:
    return Prepared(
        tensor=np.full_like(prep.tensor, 7.0),
        transform=prep.transform,
        display=prep.display,
        pixel_spacing=prep.pixel_spacing,
        display_factor=prep.display_factor,
    )


def test_cache_never_serves_another_input_or_bundle_version(chest) -> None:
    settings, engines, manifest, path = chest
    ds = pydicom.dcmread(path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    other_sha = hashlib.sha256(b"other bytes").hexdigest()
    old = manifest.model_copy(update={"version": "0.9.0"})
    assert cache_key(sha, manifest) != cache_key(other_sha, manifest) != cache_key(sha, old)
    fresh = prepare(ds, manifest.input.preprocessing, settings.pipeline.max_pixels)
    cache = PreparedCache(2**26)
    cache.put(cache_key(other_sha, manifest), _poison(fresh))  # same SOP instance, other bytes
    cache.put(cache_key(sha, old), _poison(fresh))  # same bytes, previous bundle version
    worker = PipelineWorker(settings, Store(settings.db_path), engines, prepared=cache)
    (r,) = route(engines.active(), [ds], [], None)
    assert r.manifest.version == manifest.version != old.version
    hits: list[int] = []
    a = analyse_route(r, settings.pipeline, worker.cached_lookup(r.manifest, [ds], [sha], hits))
    assert hits == [] and cache.misses == 1
    _same_prepared(a.prepared[0], fresh)
    # the right key is served (this is what the worker would get): proves the lookup does use the cache
    cache.put(cache_key(sha, manifest), _poison(fresh))
    b = analyse_route(r, settings.pipeline, worker.cached_lookup(r.manifest, [ds], [sha], hits))
    assert hits == [1] and float(b.prepared[0].tensor.max()) == 7.0


def test_preparer_keys_by_sha_and_skips_other_modalities(chest) -> None:
    settings, engines, manifest, path = chest
    cache = PreparedCache(2**26)
    preparer = EarlyPreparer(settings, engines, cache)
    header = StoredInstanceHeader(modality="DX")
    inst = StoredInstance(1, path, "a" * 64, header)
    assert preparer.prepare_instance(inst) == 1
    assert cache_key("a" * 64, manifest) in cache and cache_key("b" * 64, manifest) not in cache
    assert preparer.prepare_instance(inst) == 0  # already cached: not prepared again
    ct = StoredInstance(2, path, "c" * 64, StoredInstanceHeader(modality="CT"))
    assert preparer.prepare_instance(ct) == 0 and len(cache) == 1  # no bundle takes CT: file never read
    missing = StoredInstance(3, path.with_name("gone.dcm"), "d" * 64, header)
    assert preparer.prepare_instance(missing) == 0  # unreadable: just a miss


def StoredInstanceHeader(modality: str):  # noqa: N802 - a header as the receiver parses it
    from appliance.ingest.header import InstanceHeader

    return InstanceHeader("1.2", "1.2.3", "1.2.3.4", "1.2.840.10008.5.1.4.1.1.1.1", modality)


def test_lru_by_bytes_oversize_entries_and_read_only(chest) -> None:
    settings, engines, manifest, path = chest
    ds = pydicom.dcmread(path)
    prep = prepare(ds, manifest.input.preprocessing, settings.pipeline.max_pixels)
    size = prepared_bytes(prep)
    cache = PreparedCache(max_bytes=3 * size, max_entry_bytes=size)
    keys = [(f"{i:064x}", "b", "1") for i in range(4)]
    for k in keys[:3]:
        assert cache.put(k, _poison(prep))
    assert cache.get(keys[0]) is not None  # now the most recently used
    assert cache.put(keys[3], _poison(prep))
    assert keys[1] not in cache and all(k in cache for k in (keys[0], keys[2], keys[3]))
    assert cache.nbytes == 3 * size <= cache.max_bytes
    big = Prepared(np.zeros((1, 600, 600), np.float32), prep.transform, prep.display, None)
    assert not cache.put(("e" * 64, "b", "1"), big) and len(cache) == 3  # larger than an entry may be
    entry = cache.get(keys[0])
    with pytest.raises(ValueError):
        entry.tensor[0, 0, 0] = 1.0  # shared entries cannot be changed by a user


def test_worker_waits_for_an_image_being_prepared_and_queue_is_bounded(chest) -> None:
    settings, engines, manifest, path = chest
    cache = PreparedCache(2**26)
    key = ("f" * 64, "b", "1")
    prep = prepare(pydicom.dcmread(path), manifest.input.preprocessing, settings.pipeline.max_pixels)
    assert cache.claim(key) and not cache.claim(key)
    threading.Timer(0.2, cache.finish, (key, prep)).start()
    t0 = time.monotonic()
    assert cache.get(key, wait_s=5.0) is prep and time.monotonic() - t0 < 4.0
    failed = ("0" * 64, "b", "1")
    assert cache.claim(failed)
    cache.finish(failed, None)  # preparation failed: a miss ...
    assert cache.get(failed, wait_s=1.0) is None
    assert not cache.claim(failed)  # ... which the worker prepared itself: the early thread does not redo it

    settings.pipeline.early_queue_size = 2
    preparer = EarlyPreparer(settings, engines, cache)  # not started: nothing takes the queue
    inst = StoredInstance(1, path, "a" * 64, StoredInstanceHeader("DX"))
    t0 = time.monotonic()
    for _ in range(5):
        preparer.submit(inst)
    assert time.monotonic() - t0 < 0.5 and preparer.queue.qsize() == 2 and preparer.skipped == 3


def test_preparation_waits_while_receiving_at_most_max_defer(chest) -> None:
    settings, engines, manifest, path = chest
    busy = threading.Event()
    busy.set()
    settings.pipeline.early_max_defer_s = 30.0
    cache = PreparedCache(2**26)
    preparer = EarlyPreparer(settings, engines, cache, busy.is_set)
    preparer.start()
    try:
        preparer.submit(StoredInstance(1, path, "a" * 64, StoredInstanceHeader("DX")))
        time.sleep(0.5)
        assert len(cache) == 0  # an association is open: not yet
        busy.clear()
        deadline = time.monotonic() + 10
        while len(cache) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cache_key("a" * 64, manifest) in cache
        settings.pipeline.early_max_defer_s = 0.3  # a receiver that never goes idle delays it only so long
        busy.set()
        t0 = time.monotonic()
        preparer.submit(StoredInstance(1, path, "b" * 64, StoredInstanceHeader("DX")))
        while len(cache) == 1 and time.monotonic() - t0 < 10:
            time.sleep(0.01)
        assert cache_key("b" * 64, manifest) in cache and 0.25 < time.monotonic() - t0 < 5
    finally:
        preparer.stop()
