"""No oracles: ``resend`` takes only the cloud pseudonym (a real Study UID is answered as an unknown one), and the
plaintext health message gives the last study's time to the hour only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.app.methods import ControlMethods
from appliance.cloud import crypto, deid, payload
from appliance.cloud.agent import CloudAgent
from appliance.cloud.overlay import CloudOverlay
from appliance.cloud.result_messages import CloudResultPublisher
from appliance.core.config import Settings
from appliance.core.store import Store

pytestmark = pytest.mark.unit
REAL_UID = "1.2.826.0.1.3680043.8.498.123456789"
AT = 1767268799.25  # 2026-01-01T11:59:59.25Z


def _box(home: Path) -> tuple[Settings, Store]:
    _, pub = crypto.generate_keypair()
    settings = Settings(state_dir=home, cloud={"device_id": "dev-1", "recipient_keys": {"c": pub}})
    store = Store(settings.db_path)
    with store.transaction() as conn:
        sid = conn.execute(
            "INSERT INTO studies(study_uid, state, created_at, updated_at, last_instance_at) VALUES (?,?,?,?,?)",
            (REAL_UID, "inferred", AT, AT, AT),
        ).lastrowid
        conn.execute(
            "INSERT INTO results(study_id, study_uid, bundle_id, bundle_version, summary, dir, created_at)"
            " VALUES (?,?,'cxr','1.0','{}','results/x',?)",
            (sid, REAL_UID, AT),
        )
    return settings, store


def test_resend_refuses_a_real_study_uid_exactly_as_an_unknown_one(home: Path) -> None:
    settings, store = _box(home)
    control = ControlMethods(settings, store, CloudResultPublisher(settings, CloudOverlay(settings.cloud, store)))
    real = control.resend({"study_uid": REAL_UID})
    unknown = control.resend({"study_uid": "1.2.3.4"})
    assert real == unknown and real[0] == 404
    pseudonym = deid.pseudonym_uid(deid.load_or_create_device_secret(settings.secrets_dir), REAL_UID)
    assert pseudonym != REAL_UID and control._study_rows(pseudonym)  # the pseudonym does name the study


def test_health_gives_the_last_study_time_to_the_hour(home: Path) -> None:
    settings, store = _box(home)
    agent = CloudAgent(settings, store)
    reported = agent.reported()
    assert reported["last_study_at"] == "2026-01-01T11:00:00Z"
    _, body = payload.build_health_message({"reported": reported}, settings)
    assert "11:59" not in body.decode() and json.loads(body)["reported"]["last_study_at"].endswith(":00:00Z")
