from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from appliance.core.store import Store, _migrations, now
from appliance.lifecycle import studies
from appliance.lifecycle.studies import COMPLETE, RECEIVED


def test_migrations_apply_once_and_reopen(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    s = Store(db)
    latest = max(v for v, _, _ in _migrations())
    assert s.schema_version() == latest
    assert s.query("PRAGMA journal_mode")[0][0] == "wal"
    s.close()
    s2 = Store(db)  # re-open: nothing re-applied, no error
    assert s2.schema_version() == latest


def test_state_transition_recorded_and_rollback(tmp_path: Path) -> None:
    s = Store(tmp_path / "state.db")
    t = now()
    with s.transaction() as c:
        cur = c.execute(
            "INSERT INTO studies(study_uid, state, created_at, updated_at, last_instance_at) VALUES (?,?,?,?,?)",
            ("1.2.3", RECEIVED, t, t, t),
        )
        sid = cur.lastrowid
    with s.transaction() as c:
        studies.transition(c, sid, RECEIVED, COMPLETE, "quiet period over")
    assert s.state_counts() == {COMPLETE: 1}
    ev = s.query("SELECT from_state, to_state, detail FROM study_events WHERE study_id=?", (sid,))
    assert [tuple(r) for r in ev] == [(RECEIVED, COMPLETE, "quiet period over")]
    with pytest.raises(studies.IllegalTransition), s.transaction() as c:
        studies.transition(c, sid, COMPLETE, "bogus")
    assert s.state_counts() == {COMPLETE: 1}
    with pytest.raises(sqlite3.IntegrityError), s.transaction() as c:
        c.execute(
            "INSERT INTO studies(study_uid, state, created_at, updated_at, last_instance_at) VALUES (?,?,?,?,?)",
            ("1.2.3", RECEIVED, t, t, t),
        )
    assert len(s.query("SELECT * FROM studies")) == 1
