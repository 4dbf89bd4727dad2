"""In-process tests of the receive parts: records, assembler, spool, allowlist."""

from __future__ import annotations

import threading
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from appliance.config import AllowedCaller, DicomConfig
from appliance.dicom import records
from appliance.dicom.assembler import StudyAssembler
from appliance.dicom.header import InstanceHeader
from appliance.dicom.scp import StorageSCP, caller_allowed
from appliance.dicom.spool import Spool, safe_component
from appliance.store import COMPLETE, RECEIVED, Store


def _header(study: str, sop: str | None = None) -> InstanceHeader:
    return InstanceHeader(study, "1.2.3", sop or generate_uid(), "1.2.840.10008.5.1.4.1.1.2", "CT")


def _record(store: Store, spool: Spool, h: InstanceHeader, data: bytes, assoc: set[int]) -> records.Recorded:
    import hashlib

    sha = hashlib.sha256(data).hexdigest()
    rel = spool.relpath(h.study_uid, h.sop_instance_uid, sha)
    spool.write_durable(rel, data)
    return records.record_instance(
        store,
        h,
        rel_path=rel,
        size=len(data),
        sha256=sha,
        transfer_syntax=ExplicitVRLittleEndian,
        calling_ae="T",
        assoc_studies=assoc,
    )


def test_assembler_waits_for_association_and_quiet_then_hooks_once(tmp_path: Path) -> None:
    store, spool = Store(tmp_path / "state.db"), Spool(tmp_path / "spool")
    asm = StudyAssembler(store, quiet_seconds=0.0)
    seen: list[int] = []
    asm.on_complete.append(seen.append)
    asm.on_complete.append(lambda sid: 1 / 0)  # a broken hook must not undo or block anything
    assoc: set[int] = set()
    rec = _record(store, spool, _header("1.2.9"), b"a", assoc)
    assert asm.complete_due() == []  # association still open
    records.release_association(store, assoc)
    assert asm.complete_due() == [rec.study_id] and seen == [rec.study_id]
    assert asm.complete_due() == [] and seen == [rec.study_id]  # once
    assert store.query("SELECT state FROM studies")[0]["state"] == COMPLETE
    # late instance: revision 2, with the whole study available cumulatively
    assoc2: set[int] = set()
    late = _record(store, spool, _header("1.2.9"), b"b", assoc2)
    assert late.new_revision == 2 and late.study_id != rec.study_id
    assert len(records.study_instances(store, spool.root, late.study_id)) == 1
    files = records.study_instances(store, spool.root, late.study_id, cumulative=True)
    assert [f.path.read_bytes() for f in files] == [b"a", b"b"]


def test_quiet_period_respected(tmp_path: Path) -> None:
    store, spool = Store(tmp_path / "state.db"), Spool(tmp_path / "spool")
    asm = StudyAssembler(store, quiet_seconds=30.0)
    assoc: set[int] = set()
    _record(store, spool, _header("1.2.10"), b"a", assoc)
    records.release_association(store, assoc)
    assert asm.complete_due() == []
    store.conn.execute("UPDATE studies SET last_instance_at = last_instance_at - 31")
    assert len(asm.complete_due()) == 1


def test_assembler_thread_completes_promptly_after_poke(tmp_path: Path) -> None:
    store, spool = Store(tmp_path / "state.db"), Spool(tmp_path / "spool")
    asm = StudyAssembler(store, quiet_seconds=0.2)
    done = threading.Event()
    asm.on_complete.append(lambda sid: done.set())
    asm.start()
    try:
        assoc: set[int] = set()
        _record(store, spool, _header("1.2.11"), b"a", assoc)
        records.release_association(store, assoc)
        asm.poke()
        assert done.wait(3)
    finally:
        asm.stop()


def test_recover_resets_stuck_associations_and_sweeps_orphans(tmp_path: Path) -> None:
    store, spool = Store(tmp_path / "state.db"), Spool(tmp_path / "spool")
    assoc: set[int] = set()
    rec = _record(store, spool, _header("1.2.12"), b"kept", assoc)  # association never closed: a crash
    orphan = spool.root / "1.2.12" / "never-recorded.dcm"
    orphan.write_bytes(b"x")
    tmp = spool.root / "1.2.12" / ".tmp-abc"
    tmp.write_bytes(b"partial")
    scp = StorageSCP(DicomConfig(port=0), store, spool)
    scp.recover()
    assert store.query("SELECT assoc_open FROM studies")[0]["assoc_open"] == 0
    assert not orphan.exists() and not tmp.exists()
    assert [f.path.read_bytes() for f in records.study_instances(store, spool.root, rec.study_id)] == [b"kept"]
    assert StudyAssembler(store, 0.0).complete_due() == [rec.study_id]


def test_duplicate_record_is_idempotent(tmp_path: Path) -> None:
    store, spool = Store(tmp_path / "state.db"), Spool(tmp_path / "spool")
    h = _header("1.2.13")
    first = _record(store, spool, h, b"same", set())
    again = _record(store, spool, h, b"same", set())
    assert again.duplicate and again.instance_id == first.instance_id
    assert store.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 1
    assert store.query("SELECT state FROM studies")[0]["state"] == RECEIVED


def test_spool_names_are_safe() -> None:
    assert safe_component("1.2.840.10008.1") == "1.2.840.10008.1"
    for bad in ("../../etc/passwd", "..", ".", "", "a/b", "x\x00y", "1.2 3"):
        name = safe_component(bad)
        assert "/" not in name and "\x00" not in name and name not in ("", ".", "..") and not name.startswith(".")
    assert safe_component("a/b") != safe_component("a_b")  # sanitised names stay distinct


def test_allowlist_matching() -> None:
    cfg = DicomConfig(
        allowlist_enabled=True,
        allowed_callers=[AllowedCaller(ae_title="CR1", host="192.168.1.0/24"), AllowedCaller(ae_title="ANY")],
    )
    assert caller_allowed(cfg, "CR1", "192.168.1.7")
    assert not caller_allowed(cfg, "CR1", "192.168.2.7")
    assert caller_allowed(cfg, "ANY", "10.0.0.1")
    assert not caller_allowed(cfg, "OTHER", "192.168.1.7")
    assert caller_allowed(DicomConfig(), "WHOEVER", "8.8.8.8")  # allowlist off
