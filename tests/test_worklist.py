"""The worklist read model and the operator actions on the real modules: instances filed as ingest files them
(header parsed from the Part-10 bytes), analysed by the pipeline worker on a real ONNX model, then listed,
looked at, retried and resent."""

from __future__ import annotations

import io
import sqlite3
from datetime import date, timedelta
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from appliance.core import audit
from appliance.core.config import PacsDestination, Settings
from appliance.core.store import Store
from appliance.ingest.header import parse_header
from appliance.ingest.records import record_instance
from appliance.lifecycle import studies
from appliance.lifecycle.studies import COMPLETE, EXPORTED, INFERRED, NO_MODEL, RECEIVED
from appliance.pipeline.worker import PipelineWorker, StaticBundles
from appliance.worklist.actions import Refused, resend_to_pacs, retry_analysis
from appliance.worklist.read import AmbiguousStudy, StudyNotFound, find_study, list_studies, study_detail
from testsupport.pipeline import TinyEngine, make_dataset, synthetic_image, tiny_manifest

pytestmark = pytest.mark.unit


@pytest.fixture
def env(home: Path) -> tuple[Settings, Store]:
    settings = Settings(state_dir=home)
    return settings, Store(settings.db_path)


def file_instance(settings: Settings, store: Store, ds: Dataset) -> int:
    """File one instance exactly as the SCP does: Part-10 bytes in the spool, header parsed from them, row
    recorded by ``ingest.records``. Returns the study id."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    rel = f"test/{ds.SOPInstanceUID}.dcm"
    path = settings.spool_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    header = parse_header(data, str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID))
    rec = record_instance(
        store,
        header,
        rel_path=rel,
        size=len(data),
        sha256=str(ds.SOPInstanceUID),
        transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
        calling_ae="MODALITY",
        assoc_studies=set(),
    )
    return rec.study_id


def complete(store: Store, study_id: int) -> None:
    with store.transaction() as conn:
        studies.transition(conn, study_id, RECEIVED, COMPLETE, "test: complete", completed=True)


def chest(study_uid: str | None = None, nodule: bool = True, **kw: object) -> Dataset:
    return make_dataset(synthetic_image(300, 240, (100, 120) if nodule else None, radius=10), study_uid=study_uid, **kw)


def analysed_study(settings: Settings, store: Store, ds: list[Dataset]) -> int:
    sid = 0
    for d in ds:
        sid = file_instance(settings, store, d)
    complete(store, sid)
    assert PipelineWorker(settings, store, StaticBundles([(tiny_manifest(), TinyEngine())])).process(sid) == INFERRED
    return sid


def test_demographics_are_stored_with_the_instance_and_decoded_by_character_set(env) -> None:
    settings, store = env
    ds = chest()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^Jürgen=ミュラー"
    ds.PatientID = "ID-ÄÖ"
    ds.AccessionNumber = "A12345"
    ds.StudyDate = "20261129"
    sid = file_instance(settings, store, ds)
    (s,) = list_studies(store)
    assert s.id == sid and s.state == RECEIVED and s.images == 1
    assert s.patient_name == "Müller^Jürgen=ミュラー" and s.patient_id == "ID-ÄÖ"
    assert s.accession_number == "A12345" and s.study_date == "20261129"
    assert s.findings == [] and not s.urgent and s.pseudonym is None

    latin = chest()
    latin.SpecificCharacterSet = "ISO_IR 100"
    latin.PatientName = "Gonçalves^José"
    file_instance(settings, store, latin)
    assert list_studies(store)[0].patient_name == "Gonçalves^José"


def test_an_analysed_study_shows_findings_patient_objects_and_timeline(env) -> None:
    settings, store = env
    settings.pipeline.destinations = [PacsDestination(name="pacs", ae_title="PACS", host="127.0.0.1", port=104)]
    uid = "1.2.826.0.1.3680043.8.498.777.1"
    sid = analysed_study(settings, store, [chest(uid), chest(uid, nodule=False)])
    (s,) = list_studies(store)
    assert (s.id, s.study_uid, s.state, s.images) == (sid, uid, INFERRED, 2)
    assert (s.patient_name, s.patient_id, s.accession_number, s.modality) == ("Test^Patient", "P123", "ACC1", "DX")
    (f,) = s.findings  # one per (bundle, label): the highest score of the two images
    assert f["bundle_id"] == "tiny-cxr" and f["label"] == "nodule" and f["threshold"] == 0.3
    assert f["positive"] is True and f["score"] >= 0.3

    d = study_detail(store, sid)
    assert d.summary == s
    assert len(d.images) == 2 and all(len(i["objects"]) == 1 and i["objects"][0]["kind"] == "SC" for i in d.images)
    assert [o["kind"] for o in d.study_objects] == ["SR"]
    for o in [*d.study_objects, *(i["objects"][0] for i in d.images)]:
        assert not o["path"].startswith("/") and (settings.state_dir / o["path"]).is_file()
        assert o["exported"] is False  # queued, not acknowledged
    positives = [x for i in d.images for x in i["findings"] if x["positive"]]
    assert len(positives) == 1  # the image with the nodule
    assert d.export_pending == 3
    whats = [t["what"] for t in d.timeline]
    assert whats[:4] == ["received", "complete", "inferring", "export queued"] and "inferred" in whats
    assert [t["at"] for t in d.timeline] == sorted(t["at"] for t in d.timeline)


def test_filters_by_state_date_and_finding(env) -> None:
    settings, store = env
    pos = analysed_study(settings, store, [chest()])
    neg = analysed_study(settings, store, [chest(nodule=False)])
    ct = file_instance(settings, store, chest(modality="CT"))
    complete(store, ct)
    assert PipelineWorker(settings, store, StaticBundles([(tiny_manifest(), TinyEngine())])).process(ct) == NO_MODEL

    assert [s.id for s in list_studies(store)] == [ct, neg, pos]  # newest first
    assert [s.id for s in list_studies(store, limit=2)] == [ct, neg]
    assert [s.id for s in list_studies(store, state=NO_MODEL)] == [ct]
    assert [s.id for s in list_studies(store, finding="nodule")] == [pos]
    assert [s.id for s in list_studies(store, finding="NODULE")] == [pos]
    assert list_studies(store, finding="effusion") == []
    today = date.today()
    assert len(list_studies(store, since=today, until=today)) == 3
    assert list_studies(store, since=today + timedelta(days=1)) == []
    assert list_studies(store, until=today - timedelta(days=1)) == []
    with pytest.raises(ValueError, match="unknown state"):
        list_studies(store, state="bogus")
    with pytest.raises(ValueError, match="after"):
        list_studies(store, since=today, until=today - timedelta(days=1))


def test_find_study_by_id_uid_and_unique_suffix(env) -> None:
    settings, store = env
    a = file_instance(settings, store, chest("1.2.3.4.100.5555"))
    b = file_instance(settings, store, chest("1.2.3.4.200.5555"))
    c = file_instance(settings, store, chest("1.2.3.4.300.7777"))
    assert find_study(store, str(b)) == b
    assert find_study(store, "1.2.3.4.100.5555") == a
    assert find_study(store, "300.7777") == c and find_study(store, "…300.7777") == c
    assert find_study(store, "100.5555") == a
    with pytest.raises(AmbiguousStudy, match="5555"):
        find_study(store, ".5555")
    with pytest.raises(StudyNotFound, match="9.9.9"):
        find_study(store, "9.9.9")
    # a number that is no id is not taken for the end of a UID (id 7 would have picked "...300.7777")
    assert c < 7
    with pytest.raises(StudyNotFound, match="no study with id 7 "):
        find_study(store, "7")
    assert find_study(store, "…7") == c and find_study(store, "...7777") == c  # marked as a UID end: found
    d = file_instance(settings, store, chest("1.2.3.4.400.123456789"))
    assert find_study(store, "123456789") == d  # the 9 digits `appliance studies` shows, without the "…"
    with pytest.raises(StudyNotFound):
        find_study(store, "  ")
    with pytest.raises(StudyNotFound):
        study_detail(store, 999)


def test_retry_reopens_an_analysed_study_and_the_worker_analyses_it_again(env) -> None:
    settings, store = env
    sid = analysed_study(settings, store, [chest()])
    with store.transaction() as conn:  # as the exporter would once the PACS acknowledged everything
        studies.transition(conn, sid, INFERRED, EXPORTED, "test")
    assert retry_analysis(store, settings, sid, actor="cli:tech") == COMPLETE
    row = store.query("SELECT state, attempts FROM studies WHERE id=?", (sid,))[0]
    assert (row["state"], row["attempts"]) == (COMPLETE, 0)
    (entry,) = audit.query(store, event=audit.AuditEvent.STUDY_RETRY)
    assert entry.actor == "cli:tech" and entry.subject == f"study:{sid}" and entry.outcome == "success"
    objects_before = store.query("SELECT sop_instance_uid FROM result_objects ORDER BY id")
    assert PipelineWorker(settings, store, StaticBundles([(tiny_manifest(), TinyEngine())])).process(sid) == INFERRED
    assert store.query("SELECT sop_instance_uid FROM result_objects ORDER BY id") == objects_before  # same UIDs
    timeline = study_detail(store, sid).timeline
    whats = [t["what"] for t in timeline]
    assert whats.count("inferring") == 2 and whats.count("complete") == 2
    (asked,) = [t for t in timeline if t["what"] == "retry requested"]
    assert asked["detail"] == "by cli:tech" and whats.index("retry requested") < len(whats) - 1


@pytest.mark.parametrize("state", [RECEIVED, COMPLETE])
def test_retry_refuses_a_study_not_yet_analysed_and_writes_nothing(env, state: str) -> None:
    settings, store = env
    sid = file_instance(settings, store, chest())
    if state == COMPLETE:
        complete(store, sid)
    events = store.query("SELECT COUNT(*) AS n FROM study_events")[0]["n"]
    with pytest.raises(Refused, match="cannot be analysed again"):
        retry_analysis(store, settings, sid, actor="cli:tech")
    assert store.query("SELECT state FROM studies WHERE id=?", (sid,))[0]["state"] == state
    assert store.query("SELECT COUNT(*) AS n FROM study_events")[0]["n"] == events
    assert audit.count(store) == 0
    with pytest.raises(StudyNotFound):
        retry_analysis(store, settings, 999, actor="cli:tech")


def test_resend_requeues_every_object_for_every_destination(env) -> None:
    settings, store = env
    settings.pipeline.destinations = [PacsDestination(name="pacs", ae_title="PACS", host="127.0.0.1", port=104)]
    uid = "1.2.826.0.1.3680043.8.498.777.2"
    sid = analysed_study(settings, store, [chest(uid), chest(uid)])
    with store.transaction() as conn:  # the PACS acknowledged everything
        conn.execute("UPDATE exports SET state='done', done_at=1, attempts=1")
        studies.transition(conn, sid, INFERRED, EXPORTED, "test")
    settings.pipeline.destinations.append(PacsDestination(name="archive", ae_title="ARCH", host="127.0.0.1", port=105))
    assert resend_to_pacs(store, settings, sid, actor="cli:tech") == 3  # SR + 2 SC
    rows = store.query("SELECT destination, state, attempts FROM exports ORDER BY id")
    assert len(rows) == 6 and {r["state"] for r in rows} == {"pending"} and {r["attempts"] for r in rows} == {0}
    assert {r["destination"] for r in rows} == {"pacs", "archive"}
    assert store.query("SELECT state FROM studies WHERE id=?", (sid,))[0]["state"] == INFERRED
    (entry,) = audit.query(store, event=audit.AuditEvent.STUDY_RESEND)
    assert entry.detail["objects"] == 3 and entry.detail["new_rows"] == 3


def test_resend_refuses_without_destination_or_results(env) -> None:
    settings, store = env
    sid = file_instance(settings, store, chest())
    with pytest.raises(Refused, match="no PACS destination"):
        resend_to_pacs(store, settings, sid, actor="cli:tech")
    settings.pipeline.destinations = [PacsDestination(name="pacs", ae_title="PACS", host="127.0.0.1", port=104)]
    with pytest.raises(Refused, match="nothing to send"):
        resend_to_pacs(store, settings, sid, actor="cli:tech")
    assert audit.count(store) == 0


def test_the_worklist_reads_through_a_read_only_store_that_writes_nothing(env) -> None:
    settings, store = env
    sid = analysed_study(settings, store, [chest()])
    store.close()
    before = settings.db_path.stat().st_mtime_ns
    look = Store(settings.db_path, read_only=True)
    assert [s.id for s in list_studies(look)] == [sid] and study_detail(look, sid).summary.id == sid
    with pytest.raises(sqlite3.OperationalError, match="readonly"), look.transaction() as conn:
        conn.execute("UPDATE studies SET state='failed'")
    look.close()
    assert settings.db_path.stat().st_mtime_ns == before
    missing = settings.state_dir / "elsewhere" / "state.db"
    with pytest.raises(sqlite3.OperationalError):
        Store(missing, read_only=True).query("SELECT 1")
    assert not missing.parent.exists()  # nothing created by a look


def _worker(settings: Settings, store: Store, manifest) -> PipelineWorker:
    return PipelineWorker(settings, store, StaticBundles([(manifest, TinyEngine())]))


def test_urgent_studies_come_first_then_newest_with_the_same_filters(env) -> None:
    """Issue 19: urgent first (a finding at or above the manifest's urgent threshold), then newest received."""
    settings, store = env
    urgent_manifest = tiny_manifest().model_copy(update={"urgent": {"nodule": 0.3}})
    old_urgent = file_instance(settings, store, chest())
    complete(store, old_urgent)
    assert _worker(settings, store, urgent_manifest).process(old_urgent) == INFERRED
    pos = analysed_study(settings, store, [chest()])  # positive, not urgent (no urgent threshold)
    neg = analysed_study(settings, store, [chest(nodule=False)])
    (first, *rest) = list_studies(store)
    assert first.id == old_urgent and first.urgent
    assert [s.id for s in rest] == [neg, pos]  # the others newest first
    assert [s.id for s in list_studies(store, finding="nodule")] == [old_urgent, pos]
    assert [s.id for s in list_studies(store, urgent_only=True)] == [old_urgent]
    assert [s.id for s in list_studies(store, limit=1)] == [old_urgent]


def test_mammography_findings_read_per_breast_with_their_views(env) -> None:
    """A mass on the left breast's CC and MLO, none on the right: "L breast: mass 0.xx (CC, MLO)" first; the
    right breast's negative score is listed per breast too."""
    settings, store = env
    uid = "1.2.826.0.1.3680043.8.498.777.19"
    mg = tiny_manifest(task="mmg", label="mass", modalities=("MG",))
    views = [("L", "CC", True), ("L", "MLO", True), ("R", "CC", False), ("R", "MLO", False)]
    sid = 0
    for lat, view, mass in views:
        sid = file_instance(settings, store, chest(uid, nodule=mass, modality="MG", laterality=lat, view=view))
    complete(store, sid)
    assert _worker(settings, store, mg).process(sid) == INFERRED
    (s,) = list_studies(store)
    (f,) = s.findings
    left, right = f["sides"]
    assert (left["side"], left["positive"], left["views"]) == ("L", True, ["CC", "MLO"])
    assert right["side"] == "R" and not right["positive"]
    assert f["text"][0] == f"L breast: mass {left['score']:.2f} (CC, MLO)"
    assert f["text"][1].startswith("R breast: mass ")
