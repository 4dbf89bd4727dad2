"""The audit trail: hash chain, append-only triggers, verify naming each fault, query, DICOM A.5 messages."""

from __future__ import annotations

import base64
import json
import os
import re
import sqlite3
import ssl
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import astuple, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from appliance.core import audit
from appliance.core.audit import AuditError, AuditEvent, record_event
from appliance.core.audit_dicom import EVENT_MAPPING, to_dicom_audit_message
from appliance.core.audit_syslog import AuditForwarder
from appliance.core.config import AuditConfig, Settings, load_settings
from appliance.core.store import Store
from appliance.lifecycle.studies import FAILED
from appliance.retention.purge import purge_due
from engines.keys import key_id, public_key_b64
from testsupport.bundles import make_bundle, new_key
from testsupport.cloud import DEVICE
from testsupport.common import PYTHON, ROOT, free_port, wait_until
from testsupport.daemon import daemon_env, running_daemon
from testsupport.pki import issue_cert, make_ca
from testsupport.syslogd import SyslogTlsServer


def _store(tmp_path: Path) -> Store:
    return Store(tmp_path / "state.db")


def _tamper(db: Path, *statements: str) -> None:
    """What someone with a sqlite3 shell would do: drop the triggers, then change the table."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("DROP TRIGGER IF EXISTS audit_log_no_update")
        conn.execute("DROP TRIGGER IF EXISTS audit_log_no_delete")
        for sql in statements:
            conn.execute(sql)
    finally:
        conn.close()


def _fill(store: Store, n: int) -> None:
    for i in range(n):
        record_event(store, AuditEvent.LOGIN, actor=f"user{i}", subject=f"s{i}", detail={"n": i, "ü": [1, None]})


@pytest.mark.unit
def test_chain_links_and_verifies(tmp_path: Path) -> None:
    s = _store(tmp_path)
    assert audit.verify(s) == []
    _fill(s, 5)
    rows = audit.query(s, newest_first=False)
    assert [e.seq for e in rows] == [1, 2, 3, 4, 5]
    assert rows[0].prev_hash == audit.GENESIS_HASH
    for before, after in zip(rows, rows[1:], strict=False):
        assert after.prev_hash == before.hash
    e = rows[2]
    assert e.detail == {"n": 2, "ü": [1, None]}
    assert e.time.endswith("+00:00") and "T" in e.time
    canonical = audit.canonical_row(
        e.seq, e.time, e.event, e.actor, e.outcome, e.subject, e.source_ip, '{"n":2,"ü":[1,null]}'
    )
    assert e.hash == audit.entry_hash(canonical, e.prev_hash)
    assert audit.verify(s) == []
    assert audit.count(s) == 5


@pytest.mark.unit
def test_triggers_refuse_update_and_delete(tmp_path: Path) -> None:
    s = _store(tmp_path)
    _fill(s, 2)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        s.conn.execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = 1")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        s.conn.execute("DELETE FROM audit_log WHERE seq = 2")
    with pytest.raises(sqlite3.IntegrityError, match="forward"):
        s.conn.execute("UPDATE audit_anchor SET last_seq = 1")
    assert audit.verify(s) == []


@pytest.mark.unit
def test_verify_names_edited_deleted_and_truncated(tmp_path: Path) -> None:
    s = _store(tmp_path)
    _fill(s, 8)
    s.close()
    db = tmp_path / "state.db"
    _tamper(
        db,
        "UPDATE audit_log SET actor = 'mallory' WHERE seq = 2",
        "DELETE FROM audit_log WHERE seq IN (4, 5)",
        "DELETE FROM audit_log WHERE seq = 8",
    )
    faults = audit.verify(Store(db))
    assert [(f.seq, f.kind) for f in faults] == [(2, "edited"), (4, "deleted"), (8, "truncated")]
    assert "entries 4-5" in faults[1].message


@pytest.mark.unit
def test_verify_catches_rehashed_edit_and_renumbering(tmp_path: Path) -> None:
    s = _store(tmp_path)
    _fill(s, 4)
    e = audit.query(s, newest_first=False)[1]
    forged_detail = '{"n":99}'
    forged = audit.entry_hash(
        audit.canonical_row(e.seq, e.time, e.event, "mallory", e.outcome, e.subject, e.source_ip, forged_detail),
        e.prev_hash,
    )
    s.close()
    db = tmp_path / "state.db"
    _tamper(db, f"UPDATE audit_log SET actor='mallory', detail='{forged_detail}', hash='{forged}' WHERE seq=2")
    faults = audit.verify(Store(db))
    assert [(f.seq, f.kind) for f in faults] == [(3, "broken_chain")]
    assert "entry 2" in faults[0].message


@pytest.mark.unit
def test_verify_and_readers_survive_hostile_column_values(tmp_path: Path) -> None:
    """Someone with write access to state.db stores values no appliance code writes: bytes that are not
    UTF-8, BLOBs, numbers, a row copied under a second seq, and (with the triggers still in place) a text
    anchor, which SQLite orders after every integer so the forward-only trigger lets it through. Verify must
    name each such entry and keep checking the rest; the readers must still list the trail."""
    s = _store(tmp_path)
    _fill(s, 8)
    s.close()
    db = tmp_path / "state.db"
    # the anchor is changed first, with every trigger still in place
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("UPDATE audit_anchor SET last_seq = 'x'")
    conn.close()
    _tamper(
        db,
        "UPDATE audit_log SET actor = CAST(X'6D616CC3' AS TEXT) WHERE seq = 2",  # ends in half a UTF-8 character
        "UPDATE audit_log SET time = CAST(time AS BLOB) WHERE seq = 3",
        "UPDATE audit_log SET subject = 42 WHERE seq = 4",  # TEXT affinity: stored as the text '42'
        "UPDATE audit_log SET prev_hash = CAST(prev_hash AS BLOB) WHERE seq = 6",
    )
    faults = audit.verify(Store(db))
    assert [(f.seq, f.kind) for f in faults] == [
        (2, "edited"),
        (3, "edited"),
        (4, "edited"),
        (6, "edited"),
        (8, "anchor"),
    ]
    assert "actor" in faults[0].message and "UTF-8" in faults[0].message
    assert "time" in faults[1].message and "blob" in faults[1].message
    assert "prev_hash" in faults[3].message
    assert "last_seq" in faults[4].message

    rows = audit.query(Store(db), newest_first=False)
    assert [e.seq for e in rows] == list(range(1, 9))
    _tamper(db, "UPDATE audit_log SET detail = '" + "[" * 100_000 + "' WHERE seq = 7")  # json: RecursionError
    assert audit.query(Store(db), newest_first=False)[6].detail == {"_unreadable": "[" * 100_000}
    assert (7, "edited") in [(f.seq, f.kind) for f in audit.verify(Store(db))]
    assert rows[1].actor == "mal\ufffd"
    assert rows[0].actor == "user0" and rows[4].subject == "s4"


@pytest.mark.unit
def test_verify_names_a_row_copied_under_an_old_seq(tmp_path: Path) -> None:
    """A table rebuilt without its primary key can hold an entry twice: the copy is named, not taken for a
    deletion with a backwards range."""
    s = _store(tmp_path)
    _fill(s, 4)
    s.close()
    db = tmp_path / "state.db"
    _tamper(
        db,
        "CREATE TABLE copy AS SELECT * FROM audit_log",
        "INSERT INTO copy SELECT * FROM audit_log WHERE seq = 2",
        "DROP TABLE audit_log",
        "ALTER TABLE copy RENAME TO audit_log",
    )
    faults = audit.verify(Store(db))
    assert [(f.seq, f.kind) for f in faults] == [(2, "duplicate")]


@pytest.mark.unit
def test_record_event_rejects_bad_input_and_stores_nothing(tmp_path: Path) -> None:
    s = _store(tmp_path)
    bad: list[dict[str, Any]] = [
        dict(event="no_such_event", actor="a"),
        dict(event=AuditEvent.LOGIN, actor=""),
        dict(event=AuditEvent.LOGIN, actor="a", outcome="maybe"),
        dict(event=AuditEvent.LOGIN, actor="a", source_ip="999.1.1.1"),
        dict(event=AuditEvent.LOGIN, actor="a", detail={"p": Path("/x")}),
        dict(event=AuditEvent.LOGIN, actor="a", detail={"x": float("nan")}),
        dict(event=AuditEvent.LOGIN, actor="a", subject=3),
    ]
    for kwargs in bad:
        event = kwargs.pop("event")
        with pytest.raises(AuditError):
            record_event(s, event, **kwargs)
    assert audit.count(s) == 0


@pytest.mark.unit
def test_lone_surrogates_are_recorded_escaped_not_lost(tmp_path: Path) -> None:
    """JSON from the cloud may carry "\\ud800" (json.loads gives a lone surrogate); UTF-8 cannot hold it, and
    SQLite's binding raised UnicodeEncodeError, so the entry was lost and the caller crashed."""
    s = _store(tmp_path)
    seq = record_event(s, AuditEvent.MODEL_ROLLED_BACK, actor="cloud\udfff", subject="\ud800x", detail={"r": "\udc80"})
    e = audit.query(s)[0]
    assert (e.seq, e.actor, e.subject, e.detail) == (seq, "cloud\\udfff", "\\ud800x", {"r": "\\udc80"})
    assert audit.verify(s) == []


@pytest.mark.unit
def test_record_inside_a_transaction_joins_it(tmp_path: Path) -> None:
    s = _store(tmp_path)
    with pytest.raises(RuntimeError), s.transaction():
        record_event(s, AuditEvent.PURGE, actor="system")
        raise RuntimeError("rolled back")
    assert audit.count(s) == 0
    with s.transaction():
        assert record_event(s, AuditEvent.PURGE, actor="system") == 1
    assert audit.verify(s) == []


@pytest.mark.unit
def test_query_filters_and_pages(tmp_path: Path) -> None:
    s = _store(tmp_path)
    record_event(s, AuditEvent.LOGIN, actor="alice", source_ip="127.0.0.1")
    record_event(s, AuditEvent.LOGIN_FAILED, actor="bob", outcome="failure", source_ip="::1")
    record_event(s, AuditEvent.STUDY_VIEWED, actor="alice", subject="PSEUDO-1")
    assert [e.seq for e in audit.query(s)] == [3, 2, 1]
    assert [e.seq for e in audit.query(s, actor="alice")] == [3, 1]
    assert [e.seq for e in audit.query(s, event=AuditEvent.LOGIN_FAILED)] == [2]
    assert [e.seq for e in audit.query(s, outcome="failure")] == [2]
    assert [e.seq for e in audit.query(s, subject="PSEUDO-1")] == [3]
    assert [e.seq for e in audit.query(s, limit=1, offset=1)] == [2]
    first = audit.query(s, newest_first=False)[0]
    assert first.source_ip == "127.0.0.1"
    assert [e.seq for e in audit.query(s, since=first.time)] == [3, 2, 1]
    assert audit.query(s, until=first.time) == []
    assert audit.query(s, since="2999-01-01") == []
    assert len(audit.query(s, until="2999-01-01T00:00:00Z")) == 3
    with pytest.raises(AuditError):
        audit.query(s, since="yesterday")
    with pytest.raises(AuditError):
        audit.query(s, limit=-1)
    assert audit.count(s, actor="alice") == 2 and audit.count(s, outcome="failure", since=first.time) == 1
    assert audit.count(s, since="2999-01-01") == 0 and audit.count(s) == 3
    assert [e.seq for e in audit.query(s, after_seq=1, newest_first=False)] == [2, 3]


# -- DICOM Audit Messages (PS3.15 A.5) ----------------------------------------------------------------------


def _entry(event: AuditEvent, **over: Any) -> audit.AuditEntry:
    base: dict[str, Any] = dict(
        seq=7,
        time="2026-11-29T11:45:47.123456+00:00",
        event=event.value,
        actor="alice",
        outcome="success",
        subject=None,
        source_ip=None,
        detail={},
        prev_hash="a" * 64,
        hash="b" * 64,
    )
    base.update(over)
    return audit.AuditEntry(**base)


def _coded(elem: ET.Element | None) -> tuple[str, str, str]:
    assert elem is not None
    return elem.attrib["csd-code"], elem.attrib["codeSystemName"], elem.attrib["originalText"]


def _check_message(xml: str) -> ET.Element:
    """Parse one message and assert what PS3.15 A.5.1/A.5.2 make mandatory, in the schema's order."""
    assert xml.startswith('<?xml version="1.0" encoding="UTF-8"?>')
    root = ET.fromstring(xml.encode("utf-8"))
    assert root.tag == "AuditMessage"
    tags = [c.tag for c in root]
    assert tags[0] == "EventIdentification"
    n_ap = tags.count("ActiveParticipant")
    assert n_ap >= 1 and tags[1 : 1 + n_ap] == ["ActiveParticipant"] * n_ap
    assert tags[1 + n_ap] == "AuditSourceIdentification"
    assert set(tags[2 + n_ap :]) <= {"ParticipantObjectIdentification"}
    ev = root.find("EventIdentification")
    assert ev is not None
    assert ev.attrib["EventActionCode"] in {"C", "R", "U", "D", "E"}
    assert datetime.fromisoformat(ev.attrib["EventDateTime"]).utcoffset() is not None
    assert ev.attrib["EventOutcomeIndicator"] in {"0", "4", "8", "12"}
    ev_children = [c.tag for c in ev]
    assert ev_children[0] == "EventID"
    assert _coded(ev.find("EventID"))[1] == "DCM"
    for ap in root.findall("ActiveParticipant"):
        assert ap.attrib["UserID"] and ap.attrib["UserIsRequestor"] in {"true", "false"}
        for role in ap.findall("RoleIDCode"):
            _coded(role)
    assert [ap.attrib["UserIsRequestor"] for ap in root.findall("ActiveParticipant")].count("true") == 1
    src = root.find("AuditSourceIdentification")
    assert src is not None and src.attrib["AuditSourceID"]
    for po in root.findall("ParticipantObjectIdentification"):
        assert po.attrib["ParticipantObjectID"]
        assert [c.tag for c in po][0] == "ParticipantObjectIDTypeCode"
        _coded(po.find("ParticipantObjectIDTypeCode"))
    return root


@pytest.mark.unit
@pytest.mark.parametrize("event", list(AuditEvent))
def test_every_event_renders_a_well_formed_a5_message(event: AuditEvent) -> None:
    for outcome in ("success", "failure"):
        entry = _entry(event, outcome=outcome, subject="s-1", detail={"error": "refused"})
        root = _check_message(to_dicom_audit_message(entry, audit_source_id="box-1", ae_title="APPLIANCE"))
        ev = root.find("EventIdentification")
        assert ev is not None
        assert ev.attrib["EventOutcomeIndicator"] == ("0" if outcome == "success" else "4")
        assert _coded(ev.find("EventID")) == astuple(EVENT_MAPPING[event].event_id)
        private = [c for c in ev.findall("EventTypeCode") if c.attrib["codeSystemName"] == "99APPLIANCE"]
        assert [c.attrib["csd-code"] for c in private] == [event.value]


@pytest.mark.unit
def test_login_message_content() -> None:
    entry = _entry(
        AuditEvent.LOGIN_FAILED,
        outcome="failure",
        subject="bob",
        actor="bob",
        source_ip="192.0.2.7",
        detail={"reason": "bad password"},
    )
    root = _check_message(to_dicom_audit_message(entry, audit_source_id="box-1", enterprise_site_id="Clinic A"))
    ev = root.find("EventIdentification")
    assert ev is not None
    assert _coded(ev.find("EventID")) == ("110114", "DCM", "User Authentication")
    assert ("110122", "DCM", "Login") in [_coded(c) for c in ev.findall("EventTypeCode")]
    assert ev.attrib["EventDateTime"] == entry.time and ev.attrib["EventActionCode"] == "E"
    assert ev.findtext("EventOutcomeDescription") == "bad password"
    requestor, app = root.findall("ActiveParticipant")
    assert requestor.attrib == {
        "UserID": "bob",
        "UserIsRequestor": "true",
        "NetworkAccessPointID": "192.0.2.7",
        "NetworkAccessPointTypeCode": "2",
    }
    assert app.attrib["UserID"] == "box-1" and app.attrib["UserIsRequestor"] == "false"
    assert [_coded(r) for r in app.findall("RoleIDCode")] == [("110150", "DCM", "Application")]
    src = root.find("AuditSourceIdentification")
    assert src is not None and src.attrib == {"AuditSourceID": "box-1", "AuditEnterpriseSiteID": "Clinic A"}
    user, record = root.findall("ParticipantObjectIdentification")
    assert user.attrib["ParticipantObjectID"] == "bob" and user.attrib["ParticipantObjectTypeCode"] == "1"
    assert _coded(user.find("ParticipantObjectIDTypeCode"))[0] == "11"
    details = {
        d.attrib["type"]: base64.b64decode(d.attrib["value"]).decode() for d in record.iter("ParticipantObjectDetail")
    }
    assert details == {"seq": "7", "hash": "b" * 64, "detail": '{"reason":"bad password"}'}


@pytest.mark.unit
def test_export_message_names_source_destination_and_study_uid() -> None:
    uid = "1.2.826.0.1.3680043.8.498.1"
    entry = _entry(AuditEvent.EXPORT, actor="system", subject=uid, detail={"destination": "PACS-MAIN"})
    root = _check_message(to_dicom_audit_message(entry, audit_source_id="box-1", ae_title="BOXAE"))
    ev = root.find("EventIdentification")
    assert ev is not None and _coded(ev.find("EventID"))[0] == "110104" and ev.attrib["EventActionCode"] == "R"
    app, dest = root.findall("ActiveParticipant")
    assert app.attrib["UserIsRequestor"] == "true" and app.attrib["AlternativeUserID"] == "AETITLE=BOXAE"
    assert {_coded(r)[0] for r in app.findall("RoleIDCode")} == {"110150", "110153"}
    assert dest.attrib["UserID"] == "PACS-MAIN" and [_coded(r)[0] for r in dest.findall("RoleIDCode")] == ["110152"]
    study = root.findall("ParticipantObjectIdentification")[0]
    assert study.attrib["ParticipantObjectID"] == uid
    assert (study.attrib["ParticipantObjectTypeCode"], study.attrib["ParticipantObjectTypeCodeRole"]) == ("2", "3")
    assert _coded(study.find("ParticipantObjectIDTypeCode")) == ("110180", "DCM", "Study Instance UID")
    # not a UID (the appliance's study id): a private code, never claimed to be a Study Instance UID
    root = _check_message(to_dicom_audit_message(_entry(AuditEvent.EXPORT, subject="42"), audit_source_id="b"))
    assert (
        _coded(root.findall("ParticipantObjectIdentification")[0].find("ParticipantObjectIDTypeCode"))[1]
        == "99APPLIANCE"
    )


@pytest.mark.unit
def test_markup_in_values_is_escaped() -> None:
    nasty = "a<b>&\"c'</AuditMessage>"
    root = _check_message(
        to_dicom_audit_message(_entry(AuditEvent.LOGIN, actor=nasty, subject=nasty), audit_source_id="x")
    )
    assert root.findall("ActiveParticipant")[0].attrib["UserID"] == nasty
    assert root.findall("ParticipantObjectIdentification")[0].attrib["ParticipantObjectID"] == nasty


@pytest.mark.unit
def test_control_characters_in_values_still_give_well_formed_xml() -> None:
    """A cloud direct method's bundle id is recorded as the subject as sent (``rollback_model`` refused):
    ESC, NUL, BEL or U+FFFE there are not XML 1.0 characters, and a message holding them is not
    well-formed, so the hospital's audit repository drops it. They are written escaped instead."""
    subject = "cxr\x1b[2J\x00\ufffe"
    entry = _entry(
        AuditEvent.MODEL_ROLLED_BACK,
        actor="cloud\x07",
        subject=subject,
        outcome="failure",
        detail={"reason": "not_installed\x0b"},
    )
    root = _check_message(to_dicom_audit_message(entry, audit_source_id="box\x01"))
    assert root.findall("ParticipantObjectIdentification")[0].attrib["ParticipantObjectID"] == "cxr\\x1b[2J\\x00\\ufffe"
    assert root.findall("ActiveParticipant")[0].attrib["UserID"] == "cloud\\x07"
    assert root.find("EventIdentification/EventOutcomeDescription").text == "not_installed\\x0b"  # type: ignore[union-attr]
    assert root.find("AuditSourceIdentification").attrib["AuditSourceID"] == "box\\x01"  # type: ignore[union-attr]


@pytest.mark.unit
def test_unknown_event_is_refused_by_the_renderer() -> None:
    with pytest.raises(ValueError, match="unknown event"):
        to_dicom_audit_message(replace(_entry(AuditEvent.LOGIN), event="format_disk"))


# -- concurrency ---------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_concurrent_threads_keep_one_chain(tmp_path: Path) -> None:
    s = _store(tmp_path)

    def write(i: int) -> None:
        for n in range(40):
            record_event(s, AuditEvent.STUDY_VIEWED, actor=f"t{i}", subject=str(n))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert audit.count(s) == 160
    assert [e.seq for e in audit.query(s, newest_first=False)] == list(range(1, 161))
    assert audit.verify(s) == []


_WRITER = """
import sys, time
from pathlib import Path
from appliance.core.store import Store
from appliance.core.audit import AuditEvent, record_event
db, name, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
store = Store(Path(db))
(go.parent / f"ready-{name}").touch()
while not go.exists():
    time.sleep(0.01)
for n in range(150):
    record_event(store, AuditEvent.STUDY_VIEWED, actor=name, subject=str(n), detail={"n": n})
    time.sleep(0.005)  # yield: on a loaded machine one writer could otherwise finish before the other starts
"""


@pytest.mark.integration
def test_concurrent_processes_keep_one_chain(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    Store(db).close()  # migrated once, before the writers race
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([PYTHON, "-c", _WRITER, str(db), name, str(go)], cwd=ROOT, env=env) for name in ("p1", "p2")
    ]
    # both imported and holding the store before either writes (under load an import takes seconds)
    wait_until(lambda: all((tmp_path / f"ready-{n}").exists() for n in ("p1", "p2")), 120, "both writers ready")
    go.touch()
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    s = Store(db)
    entries = audit.query(s, newest_first=False)
    assert [e.seq for e in entries] == list(range(1, 301))
    for name in ("p1", "p2"):
        assert [e.detail["n"] for e in entries if e.actor == name] == list(range(150))  # each writer's order kept
    assert audit.verify(s) == []
    switches = sum(a.actor != b.actor for a, b in zip(entries, entries[1:], strict=False))
    assert switches >= 2, "the two writers never interleaved: the test did not exercise concurrency"


# -- the CLI, as a technician or an auditor runs it -------------------------------------------------------------


def _cli(home: Path, *args: str, cfg: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = daemon_env({"COLUMNS": "200"})
    cmd = [PYTHON, "-m", "appliance", "--home", str(home)]
    if cfg is not None:
        cmd += ["--config", str(cfg)]
    return subprocess.run([*cmd, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.integration
def test_cli_verify_names_the_edited_and_the_deleted_entry(home: Path) -> None:
    s = Store(home / "state.db")
    _fill(s, 6)
    s.close()
    r = _cli(home, "audit", "verify")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "6 entries, chain intact"

    _tamper(home / "state.db", "UPDATE audit_log SET detail = '{\"n\":99}' WHERE seq = 3")
    r = _cli(home, "audit", "verify")
    assert r.returncode == 1
    assert r.stdout.splitlines() == ["seq 3: edited: stored hash does not match the entry's content"]
    assert "chain NOT intact" in r.stderr

    _tamper(home / "state.db", "DELETE FROM audit_log WHERE seq = 5")
    r = _cli(home, "audit", "verify", "--json")
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["entries"] == 5 and doc["intact"] is False
    assert [(f["seq"], f["kind"]) for f in doc["faults"]] == [(3, "edited"), (5, "deleted")]


@pytest.mark.integration
def test_cli_list_and_export(home: Path, tmp_path: Path) -> None:
    s = Store(home / "state.db")
    record_event(s, AuditEvent.LOGIN, actor="alice", source_ip="127.0.0.1")
    record_event(s, AuditEvent.LOGIN_FAILED, actor="mallory", outcome="failure", detail={"reason": "bad password"})
    record_event(s, AuditEvent.STUDY_VIEWED, actor="alice", subject="12")
    s.close()
    r = _cli(home, "audit", "list", "--actor", "alice", "--json")
    assert r.returncode == 0, r.stderr
    assert [(e["seq"], e["event"]) for e in json.loads(r.stdout)] == [(1, "login"), (3, "study_viewed")]
    r = _cli(home, "audit", "list", "--event", "login_failed")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 1 and "mallory" in r.stdout, r.stdout
    r = _cli(home, "audit", "list", "--since", "2999-01-01")
    assert r.returncode == 0 and r.stdout.strip() == "no audit entries"
    for bad in (["--since", "last tuesday"], ["--event", "format_disk"]):
        r = _cli(home, "audit", "list", *bad)
        assert r.returncode == 2 and "error:" in r.stderr, r.stderr

    r = _cli(home, "audit", "export", "--format", "dicom")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3
    roots = [_check_message(line) for line in lines]
    assert [_coded(root.find("EventIdentification/EventID"))[0] for root in roots] == ["110114", "110114", "110103"]
    out = tmp_path / "xml"
    r = _cli(home, "audit", "export", "--format", "dicom", "--out", str(out), "--event", "study_viewed")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["audit-00000003.xml"]
    _check_message((out / "audit-00000003.xml").read_text(encoding="utf-8").strip())
    assert _cli(home, "audit", "export", "--format", "pdf").returncode == 2


@pytest.mark.integration
def test_cli_list_prints_hostile_values_inert(home: Path) -> None:
    """Values recorded from outside (a direct method's bundle id, a reason) can hold terminal escapes: ESC [1A
    ESC [2K erases the line above (hiding the entry before it from whoever reads ``audit list``), a C1 CSI or a
    bidi override reorders what is read. ``audit list`` prints them escaped; ``--json`` is ASCII-only JSON."""
    s = Store(home / "state.db")
    record_event(s, AuditEvent.LOGIN_FAILED, actor="mallory", outcome="failure")
    hostile = "\x1b[1A\x1b[2Kcxr\u202e\x9b2J\nforged line"
    record_event(
        s, AuditEvent.MODEL_ROLLED_BACK, actor="cloud", outcome="failure", subject=hostile, detail={"r": hostile}
    )
    s.close()
    r = _cli(home, "audit", "list")
    assert r.returncode == 0, r.stderr
    assert not any(c in r.stdout for c in ("\x1b", "\x9b", "\u202e")), repr(r.stdout)
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and "mallory" in lines[0] and "\\x1b[1A\\x1b[2Kcxr\\u202e\\x9b2J\\x0aforged line" in lines[1]
    r = _cli(home, "audit", "list", "--json")
    assert r.returncode == 0 and r.stdout.isascii(), repr(r.stdout)
    assert json.loads(r.stdout)[1]["subject"] == hostile


# -- events recorded by the real actions ----------------------------------------------------------------------


@pytest.mark.integration
def test_model_install_activate_rollback_are_audited(home: Path, tmp_path: Path) -> None:
    key = new_key()
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(
        '[engines]\nbackend = "ort"\ntrust_demo_key = false\ninstall_reference_bundles = false\n'
        f'[engines.trusted_keys]\n"{key_id(key)}" = "{public_key_b64(key)}"\n'
    )
    old = make_bundle(tmp_path, key, version="1.0.0")
    new = make_bundle(tmp_path, key, version="1.1.0")
    for args in (["install", str(old)], ["install", str(new)]):
        r = _cli(home, "model", *args, cfg=cfg)
        assert r.returncode == 0, r.stderr
    r = _cli(home, "model", "install", str(old), cfg=cfg)  # a downgrade without --force: refused
    assert r.returncode == 1 and "reason: downgrade" in r.stderr
    r = _cli(home, "model", "rollback", "tiny", cfg=cfg)
    assert r.returncode == 0, r.stderr
    r = _cli(home, "model", "rollback", "nosuch", cfg=cfg)
    assert r.returncode == 1
    r = _cli(home, "model", "activate", "tiny", "1.1.0", cfg=cfg)
    assert r.returncode == 0, r.stderr

    s = Store(home / "state.db")
    trail = [(e.event, e.outcome, e.subject) for e in audit.query(s, newest_first=False)]
    assert trail == [
        ("model_installed", "success", "tiny@1.0.0"),
        ("model_installed", "success", "tiny@1.1.0"),
        ("model_installed", "failure", "tiny-1.0.0.bundle"),
        ("model_rolled_back", "success", "tiny@1.0.0"),
        ("model_rolled_back", "failure", "nosuch"),
        ("model_activated", "success", "tiny@1.1.0"),
    ]
    entries = audit.query(s, newest_first=False)
    assert {e.actor for e in entries} == {audit.cli_actor()}
    assert entries[2].detail == {"reason": "downgrade"}
    assert entries[4].detail == {"reason": "no_previous"}
    assert audit.verify(s) == []


def _settled_study(store: Store, spool: Path, uid: str, updated_at: float) -> Path:
    """A study revision that failed long ago with one received file: due for purge."""
    f = spool / uid / "1.dcm"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"\0" * 132 + b"DICM")
    with store.transaction() as c:
        sid = c.execute(
            "INSERT INTO studies(study_uid, state, created_at, updated_at, last_instance_at) VALUES (?,?,?,?,?)",
            (uid, FAILED, updated_at, updated_at, updated_at),
        ).lastrowid
        c.execute(
            "INSERT INTO instances(study_id, study_uid, sop_instance_uid, sop_class_uid, transfer_syntax, path, size,"
            " sha256, received_at) VALUES (?,?,?,?,?,?,?,?,?)",
            (
                sid,
                uid,
                uid + ".1",
                "1.2.840.10008.5.1.4.1.1.7",
                "1.2.840.10008.1.2.1",
                f"{uid}/1.dcm",
                136,
                "0" * 64,
                updated_at,
            ),
        )
    return f


@pytest.mark.integration
def test_purge_pass_is_one_audit_entry_with_counts(home: Path) -> None:
    s = Store(home / "state.db")
    old = time.time() - 30 * 86400
    files = [_settled_study(s, home / "spool", f"2.25.{i}", old) for i in (1, 2)]
    s.close()
    r = _cli(home, "purge")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout.strip().splitlines()[-1])["purged"]) == 2
    assert not any(f.exists() for f in files)
    r = _cli(home, "purge")  # nothing due: no entry
    assert r.returncode == 0, r.stderr

    s = Store(home / "state.db")
    (entry,) = audit.query(s)
    assert (entry.event, entry.actor, entry.outcome, entry.subject) == ("purge", audit.cli_actor(), "success", None)
    assert entry.detail == {
        "studies": 2,
        "failed": 0,
        "instance_files": 2,
        "result_files": 0,
        "kept_outside": 0,
        "retention_days": 7.0,
    }

    # the daemon's pass (RetentionService) records as "system"
    _settled_study(s, home / "spool", "2.25.3", old)
    assert purge_due(load_settings(overrides={"state_dir": home}), s) == [3]
    assert [(e.actor, e.detail["studies"]) for e in audit.query(s, event=AuditEvent.PURGE)] == [
        ("system", 1),
        (audit.cli_actor(), 2),
    ]


# -- forwarding to the hospital's audit repository (RFC 5425 syslog over TLS) -----------------------------------

_SYSLOG = re.compile(rb"^<85>1 (\S+) (\S+) appliance (\d+) IHE\+RFC-3881 - \xef\xbb\xbf(<\?xml.*)$", re.S)


def _forward_settings(home: Path, port: int, **audit_cfg: Any) -> Settings:
    return Settings(state_dir=home, audit=AuditConfig(syslog_host="127.0.0.1", syslog_port=port, **audit_cfg))


def _received(srv: SyslogTlsServer, n: int) -> list[bytes]:
    """The first ``n`` messages the repository got, once it has them."""
    wait_until(lambda: len(srv.messages()) >= n, timeout=30, what=f"{n} syslog message(s)")
    return srv.messages()[:n]


def _event_of(msg: bytes) -> str:
    code = _parse_syslog(msg)[2].find("EventIdentification/EventTypeCode[@codeSystemName='99APPLIANCE']")
    assert code is not None
    return code.attrib["csd-code"]


def _parse_syslog(msg: bytes) -> tuple[str, str, ET.Element]:
    m = _SYSLOG.match(msg)
    assert m is not None, msg[:120]
    return m.group(1).decode(), m.group(2).decode(), _check_message(m.group(4).decode("utf-8"))


@pytest.mark.integration
def test_forwarder_sends_each_entry_once_in_order_over_mutual_tls(
    home: Path, pki: dict[str, Path], clean_env: None
) -> None:
    s = Store(home / "state.db")
    record_event(s, AuditEvent.LOGIN, actor="alice", source_ip="10.1.2.3")
    record_event(s, AuditEvent.EXPORT, actor="system", subject="5", detail={"destination": "pacs"})
    record_event(s, AuditEvent.PURGE, actor="system", detail={"studies": 2})
    with SyslogTlsServer(pki["server_crt"], pki["server_key"], client_ca=pki["ca"]) as srv:
        settings = _forward_settings(
            home,
            srv.port,
            ca_file=pki["ca"],
            cert_file=pki["device_crt"],
            key_file=pki["device_key"],
            source_id="box-7",
        )
        fwd = AuditForwarder(settings, s)
        try:
            assert fwd.forward_once() == 3
            msgs = _received(srv, 3)
            entries = audit.query(s, newest_first=False)
            for entry, msg in zip(entries, msgs, strict=True):
                timestamp, hostname, root = _parse_syslog(msg)
                assert (timestamp, hostname) == (entry.time, "box-7")
                ev = root.find("EventIdentification/EventTypeCode[@codeSystemName='99APPLIANCE']")
                assert ev is not None and ev.attrib["csd-code"] == entry.event
                seq = root.find(".//ParticipantObjectDetail[@type='seq']")
                assert seq is not None and base64.b64decode(seq.attrib["value"]) == str(entry.seq).encode()
            assert srv.client_subjects == [DEVICE]  # the box authenticated with its certificate
            assert fwd.forwarded_seq() == 3
            assert fwd.forward_once() == 0  # nothing new: nothing sent again
        finally:
            fwd.close()
        # a restarted forwarder carries on after what the repository already has
        record_event(s, AuditEvent.APPLIANCE_STOPPED, actor="system")
        fwd = AuditForwarder(settings, s)
        try:
            assert fwd.forward_once() == 1
        finally:
            fwd.close()
        msgs = _received(srv, 4)
        assert b'csd-code="appliance_stopped"' in msgs[3]


@pytest.mark.integration
def test_forwarder_keeps_entries_while_the_repository_is_down_or_untrusted(
    home: Path, tmp_path: Path, pki: dict[str, Path], clean_env: None
) -> None:
    s = Store(home / "state.db")
    record_event(s, AuditEvent.LOGIN, actor="alice")
    record_event(s, AuditEvent.LOGOUT, actor="alice")
    # nobody listening
    fwd = AuditForwarder(_forward_settings(home, free_port(), ca_file=pki["ca"]), s)
    with pytest.raises(OSError):
        fwd.forward_once()
    assert fwd.forwarded_seq() == 0
    # a server whose certificate this box does not trust
    other = tmp_path / "other-ca"
    other.mkdir()
    ca_key, ca_cert, _ = make_ca(other)
    crt, key = issue_cert(ca_key, ca_cert, "localhost", other, "server", server=True)
    with SyslogTlsServer(crt, key) as impostor:
        fwd = AuditForwarder(_forward_settings(home, impostor.port, ca_file=pki["ca"]), s)
        with pytest.raises(ssl.SSLCertVerificationError):
            fwd.forward_once()
        assert fwd.forwarded_seq() == 0 and impostor.messages() == []
    # the real repository comes back: everything goes, in order
    with SyslogTlsServer(pki["server_crt"], pki["server_key"]) as srv:
        fwd = AuditForwarder(_forward_settings(home, srv.port, ca_file=pki["ca"]), s)
        try:
            assert fwd.forward_once() == 2
        finally:
            fwd.close()
        msgs = _received(srv, 2)
        assert [_event_of(m) for m in msgs] == ["login", "logout"]


@pytest.mark.integration
def test_daemon_forwards_its_trail(home: Path, pki: dict[str, Path]) -> None:
    with SyslogTlsServer(pki["server_crt"], pki["server_key"]) as srv:
        env = {
            "APPLIANCE_AUDIT__SYSLOG_HOST": "127.0.0.1",
            "APPLIANCE_AUDIT__SYSLOG_PORT": str(srv.port),
            "APPLIANCE_AUDIT__CA_FILE": str(pki["ca"]),
            "APPLIANCE_AUDIT__FORWARD_INTERVAL_S": "0.2",
        }
        with running_daemon(home, env=env):
            wait_until(
                lambda: any(b'csd-code="appliance_started"' in m for m in srv.messages()),
                timeout=60,
                what="appliance_started at the audit repository",
            )
    s = Store(home / "state.db")
    assert [e.event for e in audit.query(s, newest_first=False)] == ["appliance_started", "appliance_stopped"]
