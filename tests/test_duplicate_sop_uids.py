"""Images that share a SOP Instance UID (issue 10, item 5): the field case ``duplicate_sop_uid_two_series.py``
(``tests/cases``: one chest study, two DX images in two series with one SOP Instance UID, the first with a
nodule, the second normal) and the other members of its family.

An image is identified by (Series Instance UID, SOP Instance UID): two series sharing a SOP UID are two images,
both analysed, each with its own SC and tracking UIDs, the conflict noted in the result, the study detail and
the log; the same SOP UID in the same series with other bytes is a corrected resend and replaces the earlier
copy (newest wins), in the same revision or a later one. Offline (``appliance infer``) decides the same way.
Right outcome of the case (its docstring): both images analysed, results distinct, never a crash, never one
result silently replacing the other; so the nodule is found on the series-1 image and not on the series-2 one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from appliance.app.infer_offline import format_table, run_offline
from appliance.core.config import PacsDestination, Settings
from appliance.core.store import Store
from appliance.ingest import records
from appliance.ingest.assembler import StudyAssembler
from appliance.ingest.header import InstanceHeader
from appliance.ingest.spool import Spool, write_all
from appliance.lifecycle.studies import EXPORTED, INFERRED
from appliance.pipeline import uids
from appliance.pipeline.results import complete_evidence
from appliance.pipeline.worker import PipelineWorker, StaticBundles
from engines.reference.phantoms import chest_phantom
from testsupport.common import wait_until
from testsupport.daemon import appliance_cli, reference_pipeline_to_pacs, running_daemon
from testsupport.dcmtk import storescu
from testsupport.orthanc import AET, Orthanc
from testsupport.pipeline import TinyEngine, make_dataset, save, synthetic_image, tiny_manifest
from testsupport.reference import reference_engines, write_case

CASE = "duplicate_sop_uid_two_series"
STUDY, SOP = "1.2.826.0.1.3680043.10.1138.1", "1.2.826.0.1.3680043.10.1138.2"


# -- derived UIDs ---------------------------------------------------------------------------------------------------


def test_per_image_uids_differ_by_series_and_are_stable() -> None:
    a = uids.sc_instance_uid(STUDY, "1.2.3.1", SOP, "b", "1")
    assert a == uids.sc_instance_uid(STUDY, "1.2.3.1", SOP, "b", "1")  # a re-run: the same UID
    others = {
        uids.sc_instance_uid(STUDY, "1.2.3.2", SOP, "b", "1"),  # same SOP UID, other series
        uids.sc_instance_uid("1.2.9", "1.2.3.1", SOP, "b", "1"),  # other study
        uids.sc_instance_uid(STUDY, None, SOP, "b", "1"),  # no series UID
        uids.sc_instance_uid(STUDY, "1.2.3.1", SOP, "b", "2"),  # other bundle version
    }
    assert a not in others and len(others) == 4
    t = uids.tracking_uid(STUDY, "1.2.3.1", SOP, "nodule", "b", "1")
    assert t != uids.tracking_uid(STUDY, "1.2.3.2", SOP, "nodule", "b", "1")
    for uid in (a, t, *others):  # PS3.5 9.1: digits and dots, at most 64 characters
        assert len(uid) <= 64 and uid.startswith("2.25.") and uid[5:].isdigit()


def test_shared_sop_uids_names_each_uid_with_its_series() -> None:
    pairs = [("s1", "x"), ("s2", "x"), ("s1", "y"), ("s1", "y"), (None, "z"), ("s3", "x"), ("", "z")]
    assert uids.shared_sop_uids(pairs) == [{"sop_instance_uid": "x", "series_uids": ["s1", "s2", "s3"]}]
    assert uids.shared_sop_uids([("s1", "x"), ("s1", "x")]) == []  # copies of one image are no conflict


# -- ingest: which copy of an image a study is analysed with ----------------------------------------------------------


def _record(store: Store, spool: Spool, study: str, series: str | None, sop: str, data: bytes, assoc: set[int]):
    f = spool.take()
    write_all(f.fd, data)
    os.fsync(f.fd)
    os.close(f.fd)
    header = InstanceHeader(study, series, sop, "1.2.840.10008.5.1.4.1.1.1.1", "DX")
    return records.record_instance(
        store,
        header,
        rel_path=f.rel,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        transfer_syntax=pydicom.uid.ExplicitVRLittleEndian,
        calling_ae="MODALITY",
        assoc_studies=assoc,
    )


def _complete(store: Store, assoc: set[int]) -> list[int]:
    records.release_association(store, assoc)
    return StudyAssembler(store, quiet_seconds=0.0).complete_due()


def test_study_instances_keeps_one_copy_per_series_and_sop_uid(tmp_path: Path) -> None:
    store, spool = Store(tmp_path / "state.db"), Spool(tmp_path / "spool")
    assoc: set[int] = set()
    first = _record(store, spool, STUDY, "s1", SOP, b"s1 image", assoc)
    second = _record(store, spool, STUDY, "s2", SOP, b"s2 image", assoc)  # the field case: another series
    third = _record(store, spool, STUDY, "s3", SOP, b"s3 image", assoc)  # a third series
    fixed = _record(store, spool, STUDY, "s1", SOP, b"s1 corrected", assoc)  # correction, same series
    again = _record(store, spool, STUDY, "s1", SOP, b"s1 corrected", assoc)  # identical resend
    (sid,) = _complete(store, assoc)
    assert not first.uid_reused and again.duplicate
    assert second.uid_reused and second.other_series and third.other_series and fixed.uid_reused
    assert fixed.other_series  # s2 and s3 carry the SOP UID too (the flag says so; s1's copy is still replaced)
    flags = {r["sha256"]: r["flags"] or "" for r in store.query("SELECT sha256, flags FROM instances")}
    assert "sop_uid_in_other_series" in flags[hashlib.sha256(b"s2 image").hexdigest()]
    files = records.study_instances(store, spool.root, sid, cumulative=True)
    assert [(f.series_uid, f.path.read_bytes()) for f in files] == [
        ("s2", b"s2 image"),
        ("s3", b"s3 image"),
        ("s1", b"s1 corrected"),
    ]
    assert len(records.study_instances(store, spool.root, sid)) == 4  # the revision as recorded: every copy

    # a later revision: a correction of the s2 image, and a fourth image without a series UID
    assoc2: set[int] = set()
    late = _record(store, spool, STUDY, "s2", SOP, b"s2 corrected", assoc2)
    _record(store, spool, STUDY, None, SOP, b"no series", assoc2)
    assert late.new_revision == 2
    (sid2,) = _complete(store, assoc2)
    files = records.study_instances(store, spool.root, sid2, cumulative=True)
    assert [(f.series_uid, f.path.read_bytes()) for f in files] == [
        ("s3", b"s3 image"),
        ("s1", b"s1 corrected"),
        ("s2", b"s2 corrected"),
        (None, b"no series"),
    ]
    # the first revision as of itself is unchanged
    assert len(records.study_instances(store, spool.root, sid, cumulative=True)) == 3


def test_same_sop_uid_in_another_study_is_not_a_conflict_within_either(tmp_path: Path) -> None:
    store, spool = Store(tmp_path / "state.db"), Spool(tmp_path / "spool")
    assoc: set[int] = set()
    _record(store, spool, STUDY, "s1", SOP, b"a", assoc)
    other = _record(store, spool, "1.2.826.0.1.3680043.10.1138.9", "s9", SOP, b"b", assoc)
    assert other.uid_reused and not other.other_series
    sids = _complete(store, assoc)
    assert [len(records.study_instances(store, spool.root, s, cumulative=True)) for s in sids] == [1, 1]


# -- the worker: every image analysed, distinct objects, the conflict in the result and the detail ------------------


def _blob_image(study: str, series: str, sop: str, at: tuple[int, int]) -> Dataset:
    ds = make_dataset(synthetic_image(300, 240, at, radius=10), study_uid=study)
    ds.SeriesInstanceUID, ds.SOPInstanceUID = series, sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    return ds


def _receive(store: Store, spool: Spool, datasets: list[Dataset]) -> int:
    """File each dataset as the receiver does (spool file + row), in one association; the study completes."""
    assoc: set[int] = set()
    for ds in datasets:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        _record(store, spool, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                buf.getvalue(), assoc)  # fmt: skip
    (sid,) = _complete(store, assoc)
    return sid


def _worker(home: Path) -> tuple[Settings, Store, Spool, PipelineWorker]:
    settings = Settings(state_dir=home)
    store = Store(settings.db_path)
    spool = Spool(settings.spool_dir)
    return settings, store, spool, PipelineWorker(settings, store, StaticBundles([(tiny_manifest(), TinyEngine())]))


def _nodules(summary: dict) -> dict[str, tuple[float, float]]:
    """image series UID -> (row, col) of its nodule finding."""
    return {
        f["image_series_uid"]: (f["location"]["row"], f["location"]["col"])
        for f in summary["findings"]
        if f["label"] == "nodule" and f["positive"]
    }


def test_three_series_sharing_a_sop_uid_are_each_analysed_with_their_own_objects(home: Path) -> None:
    settings, store, spool, worker = _worker(home)
    study = pydicom.uid.generate_uid()
    spots = {"1.2.3.1": (80, 60), "1.2.3.2": (200, 170), "1.2.3.3": (150, 120)}
    sid = _receive(store, spool, [_blob_image(study, s, SOP, at) for s, at in spots.items()])
    assert worker.process(sid) == INFERRED

    summary = json.loads(store.query("SELECT summary FROM results WHERE study_id=?", (sid,))[0]["summary"])
    assert summary["sop_uid_conflicts"] == [{"sop_instance_uid": SOP, "series_uids": sorted(spots)}]
    assert sorted(i["series_uid"] for i in summary["images"]) == sorted(spots)
    found = _nodules(summary)
    assert set(found) == set(spots)
    for series, (row, col) in spots.items():  # each image's finding where its own blob is
        assert abs(found[series][0] - row) < 8 and abs(found[series][1] - col) < 8, (series, found)

    objects = store.query("SELECT kind, sop_instance_uid, path FROM result_objects ORDER BY id")
    scs = [o for o in objects if o["kind"] == "SC"]
    assert len(scs) == 3 and len({o["sop_instance_uid"] for o in scs}) == 3 and len({o["path"] for o in scs}) == 3
    expected = {uids.sc_instance_uid(study, s, SOP, "tiny-cxr", "1.0.0") for s in spots}
    assert {o["sop_instance_uid"] for o in scs} == expected
    for o in scs:  # each SC's source is its own image
        sc = pydicom.dcmread(home / o["path"])  # stored relative to the state directory
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == SOP
    sr = pydicom.dcmread(home / next(o["path"] for o in objects if o["kind"] == "SR"))
    (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence
    listed = {(s.SeriesInstanceUID, r.ReferencedSOPInstanceUID) for s in evidence.ReferencedSeriesSequence
              for r in s.ReferencedSOPSequence}  # fmt: skip
    assert listed == {(s, SOP) for s in spots}

    detail = store.query("SELECT detail FROM studies WHERE id=?", (sid,))[0]["detail"]
    assert f"SOP Instance UID {SOP} shared by 3 images in different series, each analysed" in detail
    exports = store.query("SELECT COUNT(*) AS n FROM exports")[0]["n"]
    assert exports == 0  # no destination configured: nothing queued, but nothing dropped either

    # a re-run of the same input gives the same UIDs (nothing duplicated in a PACS)
    again = PipelineWorker(settings, store, StaticBundles([(tiny_manifest(), TinyEngine())]))
    with store.transaction() as conn:
        conn.execute("UPDATE studies SET state='complete', attempts=0 WHERE id=?", (sid,))
    assert again.process(sid) == INFERRED
    assert len(store.query("SELECT id FROM result_objects")) == 4


def test_a_correction_in_the_same_series_replaces_the_earlier_copy(home: Path) -> None:
    settings, store, spool, worker = _worker(home)
    settings.pipeline.destinations = [PacsDestination(name="pacs", ae_title="PACS", host="127.0.0.1", port=1)]
    study = pydicom.uid.generate_uid()
    wrong = _blob_image(study, "1.2.3.1", SOP, (80, 60))
    fixed = _blob_image(study, "1.2.3.1", SOP, (200, 170))
    sid = _receive(store, spool, [wrong, fixed])
    assert worker.process(sid) == INFERRED
    summary = json.loads(store.query("SELECT summary FROM results")[0]["summary"])
    assert "sop_uid_conflicts" not in summary and len(summary["images"]) == 1
    (row, col) = _nodules(summary)["1.2.3.1"]
    assert abs(row - 200) < 8 and abs(col - 170) < 8  # the newest copy was analysed
    detail = store.query("SELECT detail FROM studies WHERE id=?", (sid,))[0]["detail"]
    assert "SOP UID conflict" not in detail
    scs = store.query("SELECT sop_instance_uid FROM result_objects WHERE kind='SC'")
    assert [r["sop_instance_uid"] for r in scs] == [uids.sc_instance_uid(study, "1.2.3.1", SOP, "tiny-cxr", "1.0.0")]
    assert store.query("SELECT COUNT(*) AS n FROM exports")[0]["n"] == 2  # one SR + one SC to the one PACS


def test_complete_evidence_adds_the_missing_series_only(tmp_path: Path) -> None:
    study = pydicom.uid.generate_uid()
    a, b = (_blob_image(study, s, SOP, (80, 60)) for s in ("1.2.3.1", "1.2.3.2"))
    sr = Dataset()
    item, series = Dataset(), Dataset()
    item.StudyInstanceUID = study
    series.SeriesInstanceUID = "1.2.3.1"
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = a.SOPClassUID, SOP
    series.ReferencedSOPSequence = [ref]
    item.ReferencedSeriesSequence = [series]
    sr.CurrentRequestedProcedureEvidenceSequence = [item]
    assert complete_evidence(sr, [a, b]) == 1 and complete_evidence(sr, [a, b]) == 0
    got = [(s.SeriesInstanceUID, [r.ReferencedSOPInstanceUID for r in s.ReferencedSOPSequence])
           for s in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence]  # fmt: skip
    assert got == [("1.2.3.1", [SOP]), ("1.2.3.2", [SOP])]


# -- offline: the same decisions without a database ------------------------------------------------------------------


def test_offline_keeps_the_newest_copy_and_names_the_others(tmp_path: Path) -> None:
    study = pydicom.uid.generate_uid()
    src = tmp_path / "in"
    old = save(_blob_image(study, "1.2.3.1", SOP, (80, 60)), src / "a-old.dcm")
    new = save(_blob_image(study, "1.2.3.1", SOP, (200, 170)), src / "b-new.dcm")
    os.utime(old, ns=(1_000_000_000, 1_000_000_000))
    copy = shutil.copy(new, src / "c-copy.dcm")
    os.utime(copy, ns=(1_000_000_000, 1_000_000_000))
    other = save(_blob_image(study, "1.2.3.2", SOP, (150, 120)), src / "d-other.dcm")
    settings = Settings(state_dir=tmp_path / "home")
    report = run_offline(settings, [src], tmp_path / "out", bundles=StaticBundles([(tiny_manifest(), TinyEngine())]))
    (entry,) = report["studies"]
    assert sorted((r["path"], r["by"]) for r in entry["replaced"]) == [(str(old), str(new)), (str(copy), str(new))]
    reasons = {r["path"]: r["reason"] for r in entry["replaced"]}
    assert "identical file" in reasons[str(copy)] and "older file" in reasons[str(old)]
    assert entry["sop_uid_conflicts"] == [{"sop_instance_uid": SOP, "series_uids": ["1.2.3.1", "1.2.3.2"]}]
    (result,) = entry["results"]
    found = _nodules(result)
    assert abs(found["1.2.3.1"][0] - 200) < 8 and abs(found["1.2.3.2"][0] - 150) < 8
    sc_files = {o["path"] for o in result["objects"] if o["kind"] == "SC"}
    assert len(sc_files) == 2 and all(Path(p).exists() for p in sc_files)
    table = format_table(report)
    assert "2 images in different series share SOP Instance UID" in table and f"{old} not analysed" in table
    assert str(other) not in table  # analysed: not a note
    assert "…2.3.1/…" in table and "…2.3.2/…" in table  # findings rows tell the two images apart


# -- the field case through the reference models ----------------------------------------------------------------------


def _case_truth() -> tuple[float, float]:
    """(row, col) of the nodule in the case's series-1 image (the script's ``chest_phantom(320, 256, seed=1)``)."""
    (nodule,) = [f for f in chest_phantom(320, 256, seed=1, nodules=1).truth["findings"] if f["kind"] == "nodule"]
    x, y = nodule["center_xy"]
    return y, x


def _assert_right_outcome(summary: dict, series: list[str]) -> None:
    """The case's right outcome: both images analysed, the nodule found on the series-1 image (within 2 % of the
    image size of the truth) and not on the series-2 image."""
    assert [i["series_uid"] for i in summary["images"]] == series
    nodule = {f["image_series_uid"]: f for f in summary["findings"] if f["label"] == "nodule"}
    assert nodule[series[0]]["positive"] and not nodule[series[1]]["positive"], nodule
    assert nodule[series[0]]["score"] >= nodule[series[0]]["threshold"] > nodule[series[1]]["score"]
    row, col = _case_truth()
    loc = nodule[series[0]]["location"]
    assert abs(loc["row"] - row) <= 0.02 * 320 and abs(loc["col"] - col) <= 0.02 * 256, (loc, row, col)


def _case(tmp_path: Path) -> tuple[list[Path], list[str], str]:
    files = sorted(write_case(CASE, tmp_path / "case").glob("*.dcm"))
    ds = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert len({d.SOPInstanceUID for d in ds}) == 1 and len({d.SeriesInstanceUID for d in ds}) == 2
    return files, [str(d.SeriesInstanceUID) for d in ds], str(ds[0].SOPInstanceUID)


@pytest.mark.integration
def test_field_case_offline_both_images_analysed_with_distinct_objects(tmp_path: Path) -> None:
    files, series, sop = _case(tmp_path)
    settings, engines = reference_engines(tmp_path / "home")
    try:
        report = run_offline(settings, [files[0].parent], tmp_path / "out", bundles=engines)
    finally:
        engines.close()
    assert not report["errors"]
    (entry,) = report["studies"]
    assert entry["state"] == "inferred" and "replaced" not in entry
    assert entry["sop_uid_conflicts"] == [{"sop_instance_uid": sop, "series_uids": sorted(series)}]
    (result,) = entry["results"]
    assert result["sop_uid_conflicts"] == entry["sop_uid_conflicts"]
    _assert_right_outcome(result, series)
    scs = [o for o in result["objects"] if o["kind"] == "SC"]
    assert len({o["sop_uid"] for o in scs}) == 2 and len({o["path"] for o in scs}) == 2
    by_source = {str(pydicom.dcmread(o["path"]).SeriesInstanceUID): o for o in scs}
    assert len(by_source) == 1  # both SCs in the one AI overlay series of the study
    sr_path = next(o["path"] for o in result["objects"] if o["kind"] == "SR")
    sr = pydicom.dcmread(sr_path)
    listed = {(s.SeriesInstanceUID, r.ReferencedSOPInstanceUID)
              for s in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
              for r in s.ReferencedSOPSequence}  # fmt: skip
    assert listed == {(s, sop) for s in series}
    checked = subprocess.run(["dciodvfy", sr_path], capture_output=True, text=True, timeout=60)
    assert not [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.integration
def test_field_case_through_the_daemon_reaches_the_pacs_as_two_overlays(
    home: Path, tmp_path: Path, orthanc: Orthanc
) -> None:
    """storescu -> daemon (reference bundles) -> Orthanc: an SR and two SCs with distinct UIDs in the study, the
    nodule on the series-1 image, the conflict in the study detail and a warning in the log without patient data."""
    files, series, sop = _case(tmp_path)
    cfg, env = reference_pipeline_to_pacs(orthanc.dicom_port, AET)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    with running_daemon(home, config_toml=cfg, env=env) as d:
        sent = storescu(d.port, files)
        assert sent.stdout.count("Received Store Response (Success)") == 2, sent.stdout
        (row,) = wait_until(lambda: d.studies(EXPORTED), timeout=120, what="exported")
        assert f"SOP Instance UID {sop} shared by 2 images in different series, each analysed" in row["detail"]
        shown = appliance_cli(home, "studies", env={**d.env, "COLUMNS": "1000"})
        assert "shared by 2 images in different series" in shown.stdout, shown.stdout
        summary = json.loads(d.query("SELECT summary FROM results")[0]["summary"])
        assert summary["sop_uid_conflicts"] == [{"sop_instance_uid": sop, "series_uids": sorted(series)}]
        _assert_right_outcome(summary, series)
        flags = [r["flags"] or "" for r in d.instances()]
        assert "sop_uid_in_other_series" in flags[1]
        logs = d.logs()
        assert d.stop() == 0
    assert "images of different series share a SOP Instance UID" in logs
    assert "CASE^DUPUID" not in logs and not re.search(r"\bC20\b", logs)  # no patient name or ID
    assert "Traceback" not in logs

    tags = orthanc.instances_of_study(study_uid)
    kinds = sorted(t.get("Modality") for t in tags)
    assert kinds == ["OT", "OT", "SR"], kinds
    scs = [t for t in tags if t.get("Modality") == "OT"]
    assert len({t["SOPInstanceUID"] for t in scs}) == 2
    assert {t["SOPInstanceUID"] for t in scs} == {
        uids.sc_instance_uid(study_uid, s, sop, "cxr-phantom", summary["bundle_version"]) for s in series
    }
    sr_tags = next(t for t in tags if t.get("Modality") == "SR")
    sr = pydicom.dcmread(io.BytesIO(orthanc.instance_file(sr_tags["_id"])))
    listed = {(s.SeriesInstanceUID, r.ReferencedSOPInstanceUID)
              for s in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
              for r in s.ReferencedSOPSequence}  # fmt: skip
    assert listed == {(s, sop) for s in series}
