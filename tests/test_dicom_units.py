"""In-process tests of the receive parts: records, assembler, spool, allowlist."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from appliance.core.config import AllowedCaller, DicomConfig
from appliance.core.store import Store
from appliance.ingest import records
from appliance.ingest.assembler import StudyAssembler
from appliance.ingest.durability import Watermark, write_watermark
from appliance.ingest.header import InstanceHeader
from appliance.ingest.scp import StorageSCP, caller_allowed
from appliance.ingest.spool import Spool, write_all
from appliance.lifecycle.studies import COMPLETE, RECEIVED


def _header(study: str, sop: str | None = None) -> InstanceHeader:
    return InstanceHeader(study, "1.2.3", sop or generate_uid(), "1.2.840.10008.5.1.4.1.1.2", "CT")


def _record(store: Store, spool: Spool, h: InstanceHeader, data: bytes, assoc: set[int]) -> records.Recorded:
    import hashlib

    sha = hashlib.sha256(data).hexdigest()
    f = spool.take()
    write_all(f.fd, data)
    os.fsync(f.fd)
    os.close(f.fd)
    return records.record_instance(
        store,
        h,
        rel_path=f.rel,
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
    orphan = spool.take()  # written, never recorded: the crash came before its commit
    write_all(orphan.fd, b"x")
    os.close(orphan.fd)
    unused = spool.take()  # a reserve file never handed out
    os.close(unused.fd)
    stray = spool.root / "20260101"
    stray.mkdir()
    (stray / "left.dcm").write_bytes(b"partial")
    scp = StorageSCP(DicomConfig(port=0), store, spool)
    scp.recover()
    assert store.query("SELECT assoc_open FROM studies")[0]["assoc_open"] == 0
    assert not orphan.path.exists() and not unused.path.exists() and not stray.exists()
    assert [f.path.read_bytes() for f in records.study_instances(store, spool.root, rec.study_id)] == [b"kept"]
    assert StudyAssembler(store, 0.0).complete_due() == [rec.study_id]


def test_recover_drops_unacked_rows_whose_file_is_not_durable(tmp_path: Path) -> None:
    """Crash with the flushes overlapped: rows above the watermark are checked against their files."""
    store, spool = Store(tmp_path / "state.db"), Spool(tmp_path / "spool")
    old = _record(store, spool, _header("1.2.20"), b"acked long ago", set())
    write_watermark(tmp_path / "ingest.watermark", old.instance_id)
    spool.abspath(store.query("SELECT path FROM instances WHERE id=?", (old.instance_id,))[0]["path"]).write_bytes(
        b"acked long agX"
    )  # below the watermark: trusted, not re-read (durable when acked)
    good = _record(store, spool, _header("1.2.21"), b"complete file", set())
    short = _record(store, spool, _header("1.2.22"), b"file cut short", set())
    damaged = _record(store, spool, _header("1.2.21"), b"damaged file", set())
    missing = _record(store, spool, _header("1.2.23"), b"file never made it", set())

    def path_of(rec: records.Recorded) -> Path:
        return spool.abspath(store.query("SELECT path FROM instances WHERE id=?", (rec.instance_id,))[0]["path"])

    path_of(short).write_bytes(b"file cut")
    path_of(damaged).write_bytes(b"damaged fil\x00")
    path_of(missing).unlink()
    scp = StorageSCP(DicomConfig(port=0), store, spool)
    scp.recover()
    left = {r["id"] for r in store.query("SELECT id FROM instances")}
    assert left == {old.instance_id, good.instance_id}
    # the studies that only held dropped rows are gone with their events; 1.2.21 keeps its good row
    assert sorted(r["study_uid"] for r in store.query("SELECT study_uid FROM studies")) == ["1.2.20", "1.2.21"]
    assert (
        store.query("SELECT COUNT(*) AS n FROM study_events WHERE study_id NOT IN (SELECT id FROM studies)")[0]["n"]
        == 0
    )
    kept = {spool.abspath(r["path"]) for r in store.query("SELECT path FROM instances")}
    assert {p for p in spool.root.glob("*/*") if p.is_file()} == kept  # the dropped rows' files are swept
    assert Watermark.read(tmp_path / "ingest.watermark") == good.instance_id  # moved to the newest row


def test_watermark_never_passes_a_row_still_flushing(tmp_path: Path) -> None:
    wm = Watermark(tmp_path / "w", 10)
    a, b, c = wm.begin(), wm.begin(), wm.begin()
    assert wm.current() == 10  # no rows yet: whatever they commit will be above 10
    wm.assign(a, 11)
    wm.assign(b, 12)
    wm.done(b)
    assert wm.current() == 10  # 11 still flushing
    wm.done(a)
    assert wm.current() == 12
    wm.abandon(c)  # failed before committing anything
    d = wm.begin()
    wm.assign(d, 13)
    wm.abandon(d)  # failed after its row may have committed: held below it until restart
    e = wm.begin()
    wm.assign(e, 14)
    wm.done(e)
    assert wm.current() == 12
    wm.persist()
    assert Watermark.read(tmp_path / "w") == 12
    assert Watermark.read(tmp_path / "absent") == 0


def test_failed_file_fsync_undoes_the_committed_row(tmp_path: Path, monkeypatch) -> None:
    """The commit ran beside a file fsync that failed: the instance is refused and its row removed."""
    import errno
    import hashlib

    import pytest

    store, spool = Store(tmp_path / "state.db"), Spool(tmp_path / "spool")
    scp = StorageSCP(DicomConfig(port=0), store, spool)
    scp.recover()
    h, data = _header("1.2.30"), b"will not be durable"
    sha = hashlib.sha256(data).hexdigest()
    spool._refill()  # reserve ready, so the failure hits the overlapped flush, not the file's creation
    rows: list[str] = []

    def attempt() -> tuple[records.Recorded, str]:
        f = spool.take()
        write_all(f.fd, data)

        def record(on_row):  # type: ignore[no-untyped-def]
            rows.append(f.rel)
            return records.record_instance(
                store, h, rel_path=f.rel, size=len(data), sha256=sha, transfer_syntax="1.2.840.10008.1.2.1",
                calling_ae="T", assoc_studies=set(), on_row=on_row,
            )  # fmt: skip

        try:
            return scp._flush_and_record(f.fd, f.path, record), f.rel
        finally:
            os.close(f.fd)

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "simulated I/O error")

    monkeypatch.setattr("appliance.ingest.scp.os.fsync", eio)
    with pytest.raises(OSError):
        attempt()
    assert rows, "the row was committed beside the failing fsync"
    assert store.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 0
    assert store.query("SELECT COUNT(*) AS n FROM studies")[0]["n"] == 0
    assert not spool.abspath(rows[0]).exists()
    monkeypatch.undo()
    rec, rel = attempt()  # the modality's retry succeeds
    assert spool.abspath(rel).read_bytes() == data and scp.watermark.current() == rec.instance_id


def test_duplicate_record_is_idempotent(tmp_path: Path) -> None:
    store, spool = Store(tmp_path / "state.db"), Spool(tmp_path / "spool")
    h = _header("1.2.13")
    first = _record(store, spool, h, b"same", set())
    again = _record(store, spool, h, b"same", set())
    assert again.duplicate and again.instance_id == first.instance_id
    assert store.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 1
    assert store.query("SELECT state FROM studies")[0]["state"] == RECEIVED


def test_spool_reserve_hands_out_fresh_durable_files_and_refills(tmp_path: Path) -> None:
    """Files come ready from the reserve (created, directory fsynced) and are refilled in the
    background; an empty reserve still works (inline creation); stop removes what was never used."""
    spool = Spool(tmp_path / "spool", reserve_size=4)
    first = spool.take()  # nothing reserved yet: made inline, same guarantee
    assert spool.inline_creates == 1 and first.path.exists() and first.path.stat().st_size == 0
    spool.start()
    try:
        deadline = time.monotonic() + 5
        while len(spool._ready) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(spool._ready) == 4
        taken = [spool.take() for _ in range(10)]  # beyond the reserve: refilled or made inline
        names = {f.rel for f in [first, *taken]}
        assert len(names) == 11  # never the same file twice
        for f in taken:
            assert f.path.parent.parent == spool.root and f.path.stat().st_size == 0
            os.write(f.fd, b"data")
            os.close(f.fd)
    finally:
        spool.stop()
    os.close(first.fd)
    left = {p for p in spool.root.glob("*/*")}
    assert left == {first.path, *(f.path for f in taken)}  # unused reserve files removed at stop


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


def _outcome(fn):  # type: ignore[no-untyped-def]
    from appliance.ingest.header import MalformedInstance

    try:
        return fn()
    except MalformedInstance as bad:
        return bad.status


def test_streamed_header_decides_like_the_whole_data_set() -> None:
    """Every bundled pydicom file (and truncated copies), split into growing prefixes as the stream
    worker sees them: the early header + tail check gives the same header or status as parsing the
    whole data set at once (``parse_header``), so streaming changes no C-STORE status."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_files

    from appliance.ingest.header import (
        NotStreamable,
        check_tail,
        parse_header,
        parse_header_prefix,
        tail_is_exact,
    )
    from testsupport.dicom import file_dataset_offset, part10

    streamed = 0
    for f in get_testdata_files():
        p = Path(f)
        try:
            ds = dcmread(p, force=True, stop_before_pixels=True)
            ts = str(ds.file_meta.TransferSyntaxUID)
            body = p.read_bytes()[file_dataset_offset(p) :]
        except Exception:
            continue
        cls, uid = str(ds.get("SOPClassUID", "1.2.3")), str(ds.get("SOPInstanceUID", "1.2.4"))
        for data_set in (body, body[: len(body) - 7]):
            data = part10(cls, uid, ts, data_set)
            whole = _outcome(lambda: parse_header(data, cls, uid, ts))  # noqa: B023
            early, size = None, 4096
            try:
                while early is None and size < 2 * len(data):
                    early = parse_header_prefix(data[:size], cls, uid, ts)
                    size *= 2
            except NotStreamable:
                continue
            if early is None:
                continue
            streamed += 1
            if tail_is_exact(early, len(data), ts):
                got = early.header
            else:
                got = _outcome(lambda: check_tail(data[early.pixel_offset :], ts) or early.header)  # noqa: B023
            assert got == whole, (p.name, len(data_set), got, whole)
    assert streamed > 50
