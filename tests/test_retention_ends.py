"""Retention always ends: stalled studies, undeliverable exports, orphan result and spool files, all with real files
and the real store; the export alert in ``appliance status``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from appliance.cli.daemon_cmds import status_doc
from appliance.core.config import Settings
from appliance.core.store import Store
from appliance.delivery.export import GAVE_UP, undeliverable
from appliance.lifecycle.studies import COMPLETE, FAILED, INFERRED, INFERRING, PURGED, RECEIVED
from appliance.retention.purge import purge_due

pytestmark = pytest.mark.unit
DAY = 86400.0


def _settings(home: Path) -> Settings:
    return Settings(
        state_dir=home,
        retention={"days": 1, "stalled_days": 7, "undeliverable_days": 14, "export_alert_hours": 24},
    )


def _study(store: Store, home: Path, uid: str, state: str, updated_at: float) -> tuple[int, Path]:
    """A study revision with one spooled instance (file + row), last changed at ``updated_at``."""
    rel = f"20260101/{uid.replace('.', '')}.dcm"
    f = home / "spool" / rel
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(b"DICM" + uid.encode())
    with store.transaction() as conn:
        sid = conn.execute(
            "INSERT INTO studies(study_uid, state, created_at, updated_at, last_instance_at) VALUES (?,?,?,?,?)",
            (uid, state, updated_at, updated_at, updated_at),
        ).lastrowid
        conn.execute(
            "INSERT INTO instances(study_id, study_uid, series_uid, sop_instance_uid, sop_class_uid, transfer_syntax,"
            " modality, path, size, sha256, received_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (sid, uid, "1.9", uid + ".1", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.1.2.1", "DX", rel, 9, "x", 0),
        )
    return int(sid or 0), f


def _result(store: Store, home: Path, sid: int, uid: str, export_created_at: float) -> Path:
    """A result with one SR file and its export row, pending since ``export_created_at``."""
    rel_dir = f"results/{uid}/cxr-1.0"
    (home / rel_dir).mkdir(parents=True, exist_ok=True)
    f = home / rel_dir / "sr-1.dcm"
    f.write_bytes(b"SR")
    with store.transaction() as conn:
        rid = conn.execute(
            "INSERT INTO results(study_id, study_uid, bundle_id, bundle_version, summary, dir, created_at)"
            " VALUES (?,?,'cxr','1.0','{\"patient\": {\"PatientName\": \"X\"}}',?,0)",
            (sid, uid, rel_dir),
        ).lastrowid
        oid = conn.execute(
            "INSERT INTO result_objects(result_id, kind, sop_instance_uid, sop_class_uid, path) VALUES (?,?,?,?,?)",
            (rid, "SR", f"2.25.{sid}", "1.2.840.10008.5.1.4.1.1.88.34", f"{rel_dir}/sr-1.dcm"),
        ).lastrowid
        conn.execute(
            "INSERT INTO exports(object_id, study_id, destination, attempts, next_attempt_at, last_error, created_at)"
            " VALUES (?,?,'pacs',12,0,'association failed',?)",
            (oid, sid, export_created_at),
        )
    return f


def _state(store: Store, sid: int) -> str:
    return str(store.query("SELECT state FROM studies WHERE id=?", (sid,))[0]["state"])


def test_studies_stalled_in_any_unsettled_state_end_failed_then_purged(home: Path) -> None:
    settings, store, t0 = _settings(home), Store(home / "state.db"), time.time()
    stalled = {
        s: _study(store, home, f"1.2.{i}", s, t0 - 8 * DAY) for i, s in enumerate((RECEIVED, COMPLETE, INFERRING))
    }
    fresh, fresh_file = _study(store, home, "1.3.1", RECEIVED, t0 - 1 * DAY)
    assert purge_due(settings, store, at=t0) == []
    for state, (sid, f) in stalled.items():
        assert _state(store, sid) == FAILED and f.is_file()
        ev = store.query("SELECT detail FROM study_events WHERE study_id=? AND to_state=?", (sid, FAILED))
        assert ev[0]["detail"] == f"stalled in {state} for over 7 d"
    assert _state(store, fresh) == RECEIVED
    later = t0 + 1.5 * DAY  # failed 1.5 d ago: past retention.days; the fresh study is still under stalled_days
    assert sorted(purge_due(settings, store, at=later)) == sorted(sid for sid, _ in stalled.values())
    assert all(_state(store, sid) == PURGED and not f.exists() for sid, f in stalled.values())
    assert _state(store, fresh) == RECEIVED and fresh_file.is_file()


def test_exports_undeliverable_are_reported_then_given_up_and_their_study_purged(home: Path) -> None:
    settings, store, t0 = _settings(home), Store(home / "state.db"), time.time()
    old, old_spool = _study(store, home, "1.4.1", INFERRED, t0 - 15 * DAY)
    old_sr = _result(store, home, old, "1.4.1", t0 - 15 * DAY)
    recent, _ = _study(store, home, "1.4.2", INFERRED, t0 - 2 * 3600)
    recent_sr = _result(store, home, recent, "1.4.2", t0 - 2 * 3600)
    young, _ = _study(store, home, "1.4.3", INFERRED, t0 - 30 * 3600)
    _result(store, home, young, "1.4.3", t0 - 30 * 3600)

    alert = undeliverable(store.conn, 24 * 3600, at=t0)
    assert alert["count"] == 2 and 15 * DAY - 5 <= alert["oldest_age_s"] <= 15 * DAY + 5
    assert status_doc(settings)["exports_undeliverable"]["count"] == 2  # `appliance status` shows it

    assert purge_due(settings, store, at=t0) == [old]
    assert _state(store, old) == PURGED and not old_sr.exists() and not old_spool.exists()
    assert _state(store, recent) == INFERRED and recent_sr.is_file() and _state(store, young) == INFERRED
    states = {r["study_id"]: r["state"] for r in store.query("SELECT study_id, state FROM exports")}
    assert states == {recent: "pending", young: "pending"}  # the old one's rows went with its purge
    ev = store.query("SELECT detail FROM study_events WHERE study_id=? AND to_state=?", (old, PURGED))[0]["detail"]
    assert "1 result file(s) deleted" in ev
    assert undeliverable(store.conn, 24 * 3600, at=t0)["count"] == 1  # the 30-h one is still reported


def test_given_up_export_is_counted_until_its_study_is_purged(home: Path) -> None:
    settings, store, t0 = _settings(home), Store(home / "state.db"), time.time()
    sid, _ = _study(store, home, "1.5.1", INFERRED, t0)  # the study itself changed recently: kept by retention.days
    _result(store, home, sid, "1.5.1", t0 - 15 * DAY)
    assert purge_due(settings, store, at=t0) == []
    assert store.query("SELECT state FROM exports")[0]["state"] == GAVE_UP
    assert undeliverable(store.conn, 24 * 3600, at=t0)["count"] == 1
    assert purge_due(settings, store, at=t0 + 2 * DAY) == [sid]


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_orphan_result_and_spool_files_are_removed_after_the_grace_only(home: Path) -> None:
    settings, store, t0 = _settings(home), Store(home / "state.db"), time.time()
    sid, known_spool = _study(store, home, "1.6.1", INFERRED, t0)
    known_sr = _result(store, home, sid, "1.6.1", t0)
    orphan_dir = home / "results" / "1.6.9" / "cxr-1.0"
    orphan_dir.mkdir(parents=True)
    old_orphan, new_orphan, tmp_left = (
        orphan_dir / "sc-1.dcm",
        home / "results" / "1.6.1" / "sc-x.dcm",
        orphan_dir / ".t",
    )
    for f in (old_orphan, new_orphan, tmp_left):
        f.write_bytes(b"x")
    spool_orphan = home / "spool" / "20260101" / "deadbeef.dcm"
    spool_orphan.write_bytes(b"never acknowledged")
    reserve = home / "spool" / "20260101" / "cafe.dcm"
    reserve.write_bytes(b"")  # an empty reserve file: the running spool's, never removed here
    for f in (old_orphan, tmp_left, spool_orphan, reserve, known_sr, known_spool, orphan_dir):
        _age(f, 2 * DAY)
    _age(orphan_dir.parent, 2 * DAY)

    purge_due(settings, store, at=t0)
    assert not old_orphan.exists() and not tmp_left.exists() and not orphan_dir.parent.exists()
    assert new_orphan.is_file()  # inside the grace: may be a result being recorded right now
    assert known_sr.is_file() and known_spool.is_file() and reserve.is_file()
    assert not spool_orphan.exists()


def test_the_health_message_carries_the_undeliverable_export_alert(home: Path) -> None:
    """What the composition root gives the cloud agent: its reported properties (sent in every health message)
    carry the same alert as ``appliance status``."""
    from appliance.app.compose import compose
    from appliance.cloud import crypto, payload

    _, pub = crypto.generate_keypair()
    settings = Settings(
        state_dir=home,
        pipeline={"enabled": False},
        cloud={"enabled": True, "device_id": "dev-1", "hub_hostname": "hub.example", "recipient_keys": {"c": pub}},
    )
    store, t0 = Store(settings.db_path), time.time()
    sid, _ = _study(store, home, "1.7.1", INFERRED, t0 - 3 * DAY)
    _result(store, home, sid, "1.7.1", t0 - 3 * DAY)
    app = compose(settings, store)
    try:
        agent = next(s for s in app.services if s.name == "cloud")
        _, body = payload.build_health_message({"reported": agent.reported()}, settings)  # type: ignore[attr-defined]
        alert = json.loads(body)["reported"]["exports_undeliverable"]
        assert alert["count"] == 1 and alert["oldest_age_s"] >= 3 * DAY - 60
    finally:
        for s in app.services:
            if s.name == "pools":
                s.stop()
