"""DICOM receive against the real daemon, driven by dcmtk's storescu/echoscu (and pynetdicom for raw bytes)."""

from __future__ import annotations

import hashlib
import json
import signal
import sqlite3
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_files
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, MRImageStorage

from appliance.ingest.spool import RESERVE_SIZE
from testsupport.common import wait_until
from testsupport.daemon import appliance_cli, running_daemon, start_daemon
from testsupport.dcmtk import STORESCU, dcmtk_env, echoscu, have_dcmtk, storescp, storescu, storescu_results
from testsupport.dicom import dataset_bytes, file_dataset_offset, make_instance, part10, spool_data_files, write_series

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not have_dcmtk(), reason="dcmtk (storescu) not installed"),
]

QUIET = {"APPLIANCE_DICOM__QUIET_SECONDS": "0.5"}


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _spool_file(d, row) -> Path:
    return d.home / "spool" / row["path"]


def _testdata(name: str) -> Path:
    return next(Path(f) for f in get_testdata_files() if Path(f).name == name)


def test_echo_status_and_studies_while_running(home: Path) -> None:
    with running_daemon(home) as d:
        r = echoscu(d.port)
        assert r.returncode == 0 and "Received Echo Response (Success)" in r.stdout, r.stdout
        st = d.cli("status", "--json")
        assert st.returncode == 0, st.stderr
        doc = json.loads(st.stdout)
        assert doc["running"] is True and doc["pid"] == d.proc.pid
        assert (doc["dicom"]["host"], doc["dicom"]["port"]) == ("127.0.0.1", d.port)
        assert doc["studies"]["received"] == 0 and doc["disk"]["free_bytes"] > 0
        assert f"port={d.port}" in d.logs()  # the listening address is logged
        human = d.cli("status")
        assert human.returncode == 0 and "running" in human.stdout and str(d.port) in human.stdout
        assert json.loads(d.cli("studies", "--json").stdout) == []
    st = appliance_cli(home, "status", "--json")
    assert json.loads(st.stdout)["running"] is False


# --- every bundled pydicom file: byte-identical to what storescu sent, recorded once ----------------------

# storescu proposes a compressed transfer syntax only when told to; -R proposes only what the files need.
_TS_FLAG = {
    "1.2.840.10008.1.2": [],
    "1.2.840.10008.1.2.1": [],
    "1.2.840.10008.1.2.2": [],
    "1.2.840.10008.1.2.1.99": ["-xd"],
    "1.2.840.10008.1.2.4.50": ["-xy"],
    "1.2.840.10008.1.2.4.51": ["-xx"],
    "1.2.840.10008.1.2.4.70": ["-xs"],
    "1.2.840.10008.1.2.4.80": ["-xt"],
    "1.2.840.10008.1.2.4.81": ["-xu"],
    "1.2.840.10008.1.2.4.90": ["-xv"],
    "1.2.840.10008.1.2.4.91": ["-xw"],
    "1.2.840.10008.1.2.5": ["-xr"],
}


def _corpus_by_ts() -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = defaultdict(list)
    for f in get_testdata_files():
        p = Path(f)
        if not p.is_file():
            continue
        try:
            ds = dcmread(p, stop_before_pixels=True)
            ts = str(ds.file_meta.TransferSyntaxUID)
        except Exception:
            continue  # not a Part-10 file with a transfer syntax: storescu skips it too
        if ts in _TS_FLAG:
            groups[ts].append(p)
    return groups


def _received_set(files: list[Path]) -> dict[tuple[str, str], str]:
    out = {}
    for f in files:
        data = f.read_bytes()
        ds = dcmread(f, stop_before_pixels=True)
        out[(str(ds.file_meta.MediaStorageSOPInstanceUID), _sha(dataset_bytes(data)))] = str(
            ds.file_meta.TransferSyntaxUID
        )
    return out


def test_pydicom_corpus_stored_byte_identical_and_once(home: Path, tmp_path: Path) -> None:
    """Oracle: dcmtk storescp in bit-preserving mode (+B) receives the same storescu runs; the appliance
    must hold exactly the data set bytes storescp received (file meta aside), for every instance it acked."""
    groups = _corpus_by_ts()
    oracle_dir = tmp_path / "oracle"
    oracle_dir.mkdir()
    with storescp(oracle_dir, "+B", "+xa", "-pm", "+uf", aet="ORACLE") as port:
        for ts, files in groups.items():
            storescu(port, files, "-R", *_TS_FLAG[ts], called="ORACLE")
    sent = _received_set(list(oracle_dir.iterdir()))
    assert len(sent) > 80

    with running_daemon(home, env={"APPLIANCE_DICOM__ACCEPT_ALL_STORAGE": "true", **QUIET}) as d:
        answers: dict[str, str] = {}
        for ts, files in groups.items():
            answers.update(storescu_results(storescu(d.port, files, "-R", *_TS_FLAG[ts]).stdout))
        rows = d.instances()
        stored = {}
        for r in rows:
            data = _spool_file(d, r).read_bytes()
            assert _sha(data) == r["sha256"]  # the record describes the file
            stored[(r["sop_instance_uid"], _sha(dataset_bytes(data)))] = r["transfer_syntax"]
        assert len(stored) == len(rows)  # recorded exactly once
        acked = sum(1 for v in answers.values() if v == "Success")
        assert stored.keys() <= sent.keys(), "appliance holds bytes storescu never sent"
        # instances it acked but that are not distinct (same UID + bytes sent twice) are idempotent
        assert len(stored) <= acked
        missing = sent.keys() - stored.keys()
        # what the appliance lacks, it refused with a failure status and a log line (policy in header.py:
        # the corpus has instances without a Study Instance UID)
        refused = [f for f, v in answers.items() if v != "Success"]
        assert refused and set(answers.values()) == {"Success", "Error: CannotUnderstand"}
        refused_sops = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in refused}
        assert {sop for sop, _ in missing} <= refused_sops
        assert d.logs().count("instance refused: malformed") == len(refused)
        # compressed syntaxes really negotiated and stored as received
        assert {
            "1.2.840.10008.1.2.4.50",
            "1.2.840.10008.1.2.4.91",
            "1.2.840.10008.1.2.5",
            "1.2.840.10008.1.2.4.80",
        } <= set(stored.values())
        # sending everything again adds nothing
        for ts, files in groups.items():
            storescu(d.port, files, "-R", *_TS_FLAG[ts])
        assert len(d.instances()) == len(rows)
        assert d.alive()


def test_default_config_refuses_non_imaging_sop_class(home: Path) -> None:
    with running_daemon(home, env=QUIET) as d:
        mr = storescu(d.port, [_testdata("MR_small.dcm")])
        assert "no presentation context" in mr.stdout.lower() and not storescu_results(mr.stdout), mr.stdout
        ct = storescu(d.port, [_testdata("CT_small.dcm")])
        assert storescu_results(ct.stdout) == {str(_testdata("CT_small.dcm")): "Success"}
        assert [r["modality"] for r in d.instances()] == ["CT"]


def test_duplicates_idempotent_changed_bytes_kept(home: Path, tmp_path: Path) -> None:
    files = write_series(tmp_path / "s", 5)
    with running_daemon(home, env=QUIET) as d:
        for _ in range(2):
            r = storescu(d.port, files)
            assert list(storescu_results(r.stdout).values()) == ["Success"] * 5
        rows = d.instances()
        assert len(rows) == 5 and len({r["sop_instance_uid"] for r in rows}) == 5
        # same SOP Instance UID, different pixel bytes: both revisions kept and flagged
        ds = dcmread(files[0])
        ds.PixelData = bytes(len(ds.PixelData))
        changed = tmp_path / "changed.dcm"
        ds.save_as(changed, enforce_file_format=True)
        assert storescu_results(storescu(d.port, [changed]).stdout) == {str(changed): "Success"}
        rows = d.query("SELECT * FROM instances WHERE sop_instance_uid=? ORDER BY id", (str(ds.SOPInstanceUID),))
        assert len(rows) == 2 and rows[0]["sha256"] != rows[1]["sha256"]
        assert "sop_uid_reused" in (rows[1]["flags"] or "")
        for r in rows:
            assert _sha(_spool_file(d, r).read_bytes()) == r["sha256"]
        assert "received again with different bytes" in d.logs()


def test_multi_series_study_completes_once_and_late_instance_reopens(home: Path, tmp_path: Path) -> None:
    study = generate_uid()
    a = write_series(tmp_path / "a", 4, study_uid=study)
    b = write_series(tmp_path / "b", 3, study_uid=study)
    with running_daemon(home, env={"APPLIANCE_DICOM__QUIET_SECONDS": "1.0"}) as d:
        storescu(d.port, a)  # two associations, two series, one study
        storescu(d.port, b)
        done = wait_until(lambda: d.studies("complete"), timeout=10, what="study complete")
        assert len(done) == 1 and done[0]["study_uid"] == study and done[0]["revision"] == 1
        assert len(d.query("SELECT * FROM instances WHERE study_id=?", (done[0]["id"],))) == 7
        assert len({r["series_uid"] for r in d.instances()}) == 2
        time.sleep(1.5)  # stays complete: completed exactly once
        events = d.query("SELECT to_state FROM study_events WHERE study_id=? ORDER BY id", (done[0]["id"],))
        assert [e["to_state"] for e in events] == ["received", "complete"]
        # a late instance of the same study opens revision 2, which completes in turn
        late = tmp_path / "late.dcm"
        make_instance(study, generate_uid(), 99).save_as(late, enforce_file_format=True)
        storescu(d.port, [late])
        rev2 = wait_until(
            lambda: d.query("SELECT * FROM studies WHERE study_uid=? AND revision=2 AND state='complete'", (study,)),
            timeout=10,
            what="revision 2 complete",
        )
        assert len(d.query("SELECT * FROM instances WHERE study_id=?", (rev2[0]["id"],))) == 1
        assert d.studies("complete")[0]["id"] == done[0]["id"]  # revision 1 untouched
        listing = json.loads(d.cli("studies", "--json").stdout)
        assert [(s["revision"], s["state"], s["images"]) for s in listing] == [
            (2, "complete", 1),
            (1, "complete", 7),
        ]


def test_allowlist_rejects_unknown_callers(home: Path) -> None:
    toml = """
[dicom]
allowlist_enabled = true
allowed_callers = [
  { ae_title = "XRAY1", host = "127.0.0.0/8" },
  { ae_title = "FARAWAY", host = "10.1.2.3" },
]
"""
    with running_daemon(home, config_toml=toml) as d:
        ok = echoscu(d.port, aet="XRAY1")
        assert ok.returncode == 0 and "Success" in ok.stdout, ok.stdout
        for aet in ("ECHOSCU", "FARAWAY"):  # unknown AE; known AE from the wrong address
            r = echoscu(d.port, aet=aet)
            assert r.returncode != 0 and "Association Rejected" in r.stdout, r.stdout
        r = storescu(d.port, [_testdata("CT_small.dcm")], aet="ECHOSCU")
        assert r.returncode != 0 and d.instances() == []
        assert d.logs().count("caller not allowed") == 3
        assert d.alive()


def test_disk_guard_refuses_before_storing(home: Path, tmp_path: Path) -> None:
    files = write_series(tmp_path / "s", 2)
    with running_daemon(home, env={"APPLIANCE_DICOM__MIN_FREE_BYTES": str(10**18)}) as d:
        answers = storescu_results(storescu(d.port, files).stdout)
        assert answers and all("OutOfResources" in v.replace(" ", "") for v in answers.values()), answers
        assert d.instances() == [] and d.studies() == []
        assert spool_data_files(home / "spool") == []
        assert "disk below floor" in d.logs()


def test_oversized_data_set_drained_and_refused_association_goes_on(home: Path, tmp_path: Path) -> None:
    """A data set above max_instance_bytes is never buffered: refused with 0xA700, the next one is stored."""
    big = write_series(tmp_path / "big", 1, rows=1024, cols=1024, prefix="big")  # ~2 MiB of pixels
    small = write_series(tmp_path / "small", 1, prefix="small")
    env = {"APPLIANCE_DICOM__MAX_INSTANCE_BYTES": str(1024**2)}
    with running_daemon(home, env=env) as d:
        answers = storescu_results(storescu(d.port, [*big, *small]).stdout)
        by_name = {Path(k).name: v.replace(" ", "") for k, v in answers.items()}
        assert "OutOfResources" in by_name[big[0].name], answers
        assert "Success" in by_name[small[0].name], answers
        assert len(d.instances()) == 1
        assert "data set too large" in d.logs()


def _send_raw(port: int, cases: list[tuple[str, str, str, bytes]], tmp_path: Path) -> list[int]:
    """Send each (sop_class, sop_uid, transfer_syntax, data set bytes) unchanged with pynetdicom."""
    ae = AE(ae_title="RAWSCU")
    for ts in {c[2] for c in cases}:
        for cls in {c[0] for c in cases}:
            ae.add_requested_context(cls, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title="APPLIANCE")
    assert assoc.is_established
    statuses = []
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's data set bytes as they are, undecoded
    try:
        for i, (cls, uid, ts, body) in enumerate(cases):
            path = tmp_path / f"raw{i}.dcm"
            path.write_bytes(part10(cls, uid, ts, body))
            rsp = assoc.send_c_store(path)  # a path is sent as raw bytes, not decoded
            statuses.append(int(rsp.Status))
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        assoc.release()
    return statuses


def test_malformed_instances_refused_consistently(home: Path, tmp_path: Path) -> None:
    """Policy (appliance/ingest/header.py): refuse what cannot be filed, with a failure status and a log line."""

    def body(name: str) -> tuple[str, str, bytes]:
        p = _testdata(name)
        ds = dcmread(p, force=True, stop_before_pixels=True)
        return (
            str(ds.get("SOPClassUID", "")),
            str(ds.get("SOPInstanceUID", "")),
            p.read_bytes()[file_dataset_offset(p) :],
        )

    cls_t, uid_t, truncated = body("MR_truncated.dcm")  # pixel data shorter than its declared length
    cls_r, uid_r, rtplan = body("rtplan_truncated.dcm")
    _, _, no_ts_meta = body("meta_missing_tsyntax.dcm")  # two elements, no UIDs at all
    _, _, good_mr = body("MR_small.dcm")
    no_study = dcmread(_testdata("CT_small.dcm"))
    del no_study.StudyInstanceUID
    tmp = tmp_path / "nostudy.dcm"
    no_study.save_as(tmp, enforce_file_format=True)
    cases = [
        (cls_t, uid_t, ExplicitVRLittleEndian, truncated),
        (cls_r, uid_r, ImplicitVRLittleEndian, rtplan),
        (MRImageStorage, generate_uid(), ImplicitVRLittleEndian, no_ts_meta),
        (CTImageStorage, generate_uid(), ExplicitVRLittleEndian, b"\xde\xad\xbe\xef" * 100),
        (
            CTImageStorage,
            str(no_study.SOPInstanceUID),
            ExplicitVRLittleEndian,
            tmp.read_bytes()[file_dataset_offset(tmp) :],
        ),
        (MRImageStorage, generate_uid(), ExplicitVRLittleEndian, good_mr),  # SOP UID differs from the command
    ]
    expected = [0xC210, 0xC210, 0xC211, 0xC210, 0xC211, 0xC212]
    with running_daemon(home, env={"APPLIANCE_DICOM__ACCEPT_ALL_STORAGE": "true", **QUIET}) as d:
        assert _send_raw(d.port, cases, tmp_path) == expected
        assert d.instances() == [] and d.studies() == []
        assert d.logs().count("instance refused: malformed") == len(cases)
        # the server is still fine: a good instance is stored
        good = storescu(d.port, [_testdata("CT_small.dcm")])
        assert list(storescu_results(good.stdout).values()) == ["Success"]
        assert d.alive() and len(d.instances()) == 1


def test_invalid_config_run_exits_nonzero_naming_key(home: Path) -> None:
    from testsupport.daemon import daemon_env as env_for

    r = appliance_cli(home, "run", env=env_for({"APPLIANCE_DICOM__PORT": "70000"}), timeout=30)
    assert r.returncode == 2 and "dicom.port" in r.stderr, (r.returncode, r.stderr)
    r = appliance_cli(home, "run", env=env_for({"APPLIANCE_DICOM__MAX_ASSOCIATIONS": "lots"}), timeout=30)
    assert r.returncode == 2 and "dicom.max_associations" in r.stderr


def test_second_daemon_on_the_same_state_dir_refuses_to_start(home: Path, tmp_path: Path) -> None:
    """A technician starts ``appliance run`` by hand while the service runs: the second one exits 1
    naming the running pid, before its startup recovery could sweep the first one's in-flight and
    reserve files; the first one goes on receiving."""
    from testsupport.daemon import daemon_env as env_for

    def spool_files() -> set[Path]:
        return {p for p in (home / "spool").rglob("*") if p.is_file()}

    with running_daemon(home) as d:
        wait_until(lambda: len(spool_files()) >= RESERVE_SIZE, timeout=10, what="the spool reserve filled")
        reserve = spool_files()
        r = appliance_cli(home, "run", env=env_for(), timeout=30)
        assert r.returncode == 1, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
        assert "another appliance is running" in r.stdout + r.stderr and str(d.proc.pid) in r.stdout + r.stderr
        assert d.alive() and (home / "run" / "status.json").exists()
        assert reserve <= spool_files()  # nothing of the running daemon's was swept
        files = write_series(tmp_path / "s", 3)
        answers = storescu_results(storescu(d.port, files).stdout)
        assert list(answers.values()) == ["Success"] * 3
        assert len(d.instances()) == 3
    # once the first has stopped, the state directory is free again
    with running_daemon(home) as again:
        assert len(again.instances()) == 3


def _stream_storescu(port: int, files: list[Path], *options: str) -> subprocess.Popen:
    cmd = [STORESCU, "-v", "-aec", "APPLIANCE", *options, "127.0.0.1", str(port), *map(str, files)]
    return subprocess.Popen(
        cmd, env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )


def _read_until(proc: subprocess.Popen, predicate, lines: list[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if predicate(lines):
            return
    raise AssertionError("storescu ended before the expected point:\n" + "".join(lines[-20:]))


def test_aborted_association_records_nothing_half_received(home: Path, tmp_path: Path) -> None:
    small = write_series(tmp_path / "small", 3)
    big = write_series(tmp_path / "big", 1, rows=4096, cols=4096, prefix="big")  # 32 MiB
    with running_daemon(home, env=QUIET) as d:
        scu = _stream_storescu(d.port, [*small, *big], "--max-send-pdu", "4096")
        lines: list[str] = []
        _read_until(scu, lambda ls: f"Sending file: {big[0]}" in ls[-1], lines)
        # at once: the receiver takes the 32 MiB in ~50 ms (tests/test_dicom_ul.py cuts one deterministically)
        scu.kill()  # mid-transfer: the peer vanishes without A-ABORT or A-RELEASE
        out = "".join(lines) + (scu.stdout.read() if scu.stdout else "")
        scu.wait()
        answers = storescu_results(out)
        assert [answers.get(str(f)) for f in small] == ["Success"] * 3 and str(big[0]) not in answers
        wait_until(lambda: d.studies("complete"), timeout=10, what="the acked part completes")
        rows = d.instances()
        assert len(rows) == 3  # acknowledged instances stay, the partial one is never recorded
        on_disk = sorted(p.relative_to(home / "spool").as_posix() for p in spool_data_files(home / "spool"))
        assert on_disk == sorted(r["path"] for r in rows)
        assert "association aborted" in d.logs()
        assert d.alive()
        r = storescu(d.port, [_testdata("CT_small.dcm")])
        assert list(storescu_results(r.stdout).values()) == ["Success"]


def test_sigterm_stops_accepting_finishes_inflight_and_exits_0(home: Path, tmp_path: Path) -> None:
    files = write_series(tmp_path / "s", 400, rows=32, cols=32)
    d = start_daemon(home, env=QUIET)
    try:
        scu = _stream_storescu(d.port, files)
        lines: list[str] = []
        _read_until(
            scu, lambda ls: "Store Response (Success)" in ls[-1] and sum("Success" in x for x in ls) >= 20, lines
        )
        d.proc.send_signal(signal.SIGTERM)
        refused = wait_until(lambda: echoscu(d.port).returncode != 0, timeout=5, what="new associations refused")
        out = "".join(lines) + (scu.stdout.read() if scu.stdout else "")
        scu.wait(60)
        rc = d.proc.wait(30)
    finally:
        d.kill()
    assert refused and rc == 0, d.logs()[-2000:]
    answers = storescu_results(out)
    assert len(answers) == 400 and set(answers.values()) == {"Success"}, "in-flight association was cut"
    assert scu.returncode == 0
    conn = sqlite3.connect(home / "state.db")
    assert conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 400
    assert not (home / "run" / "status.json").exists()
    assert "appliance stopped" in d.logs()


def test_crash_loses_nothing_acknowledged(home: Path, tmp_path: Path) -> None:
    files = write_series(tmp_path / "s", 200, rows=48, cols=48)
    original = {str(f): _sha(dataset_bytes(f.read_bytes())) for f in files}
    d = start_daemon(home, env=QUIET)
    try:
        scu = _stream_storescu(d.port, files)
        lines: list[str] = []
        _read_until(scu, lambda ls: sum("Store Response (Success)" in x for x in ls) >= 60, lines)
        d.kill()  # SIGKILL mid-stream
        out = "".join(lines) + (scu.stdout.read() if scu.stdout else "")
        scu.wait(30)
    finally:
        d.kill()
    answers = storescu_results(out)
    acked = {f for f, v in answers.items() if v == "Success"}
    assert 60 <= len(acked) < 200, "the daemon must die mid-stream"

    with running_daemon(home, env=QUIET) as d2:
        by_sop = {}
        for r in d2.instances():
            data = _spool_file(d2, r).read_bytes()
            assert _sha(data) == r["sha256"], "spool file damaged"
            by_sop[r["sop_instance_uid"]] = _sha(dataset_bytes(data))
        sop_of = {str(f): str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
        for f in acked:
            assert by_sop.get(sop_of[f]) == original[f], f"acknowledged instance {f} lost or altered"
        extra = set(by_sop) - {sop_of[f] for f in acked}
        assert len(extra) <= 1  # at most the one in flight: durable, but its response never left
        assert len(by_sop) == len(d2.instances())
        files_on_disk = {p.relative_to(home / "spool").as_posix() for p in spool_data_files(home / "spool")}
        assert files_on_disk == {r["path"] for r in d2.instances()}  # no temp or orphan files left
        # the interrupted study is not stuck: its association died with the daemon
        wait_until(lambda: d2.studies("complete"), timeout=10, what="study completes after restart")
        assert d2.query("SELECT MAX(assoc_open) AS m FROM studies")[0]["m"] == 0
        # the modality re-sends the rest: everything ends up stored exactly once
        storescu(d2.port, files)
        assert len(d2.instances()) == 200
