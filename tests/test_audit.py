"""The audit trail: hash chain, append-only triggers, verify naming each fault, query, DICOM A.5 messages."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from appliance.core import audit
from appliance.core.audit import AuditError, AuditEvent, record_event
from appliance.core.store import Store


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
