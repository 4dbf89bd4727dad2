"""The whole box with cloud sync: storescu -> daemon (reference cxr-phantom bundle) -> Orthanc, and the result
as one encrypted, de-identified message in the fake IoT Hub, plus the pipeline's direct methods."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.cloud import crypto
from appliance.core import audit
from appliance.core.store import Store
from engines.reference.phantoms import PatientInfo, chest_study
from testsupport.cloud import DEVICE, cloud_env
from testsupport.common import wait_until
from testsupport.daemon import running_daemon
from testsupport.dcmtk import storescu
from testsupport.fakehub import FakeHub
from testsupport.orthanc import AET, Orthanc

pytestmark = pytest.mark.integration

PATIENT = PatientInfo(
    name="CLOUDTEST^MARGARET^Q",
    patient_id="PID-CLOUD-4711",
    birth_date="19580923",
    accession="ACC-CLOUD-0815",
    institution="Hilltop Rural Clinic",
)


def _config(pacs: Orthanc) -> str:
    return (
        "[pipeline]\nenabled = true\npoll_s = 0.2\nretry_initial_s = 0.5\n"
        f'[[pipeline.destinations]]\nname = "pacs"\nae_title = "{AET}"\nhost = "127.0.0.1"\nport = {pacs.dicom_port}\n'
    )


def test_result_reaches_pacs_and_central_team_without_phi(
    home: Path, tmp_path: Path, orthanc: Orthanc, hub: FakeHub, pki, device_key, central_keys
) -> None:
    study = chest_study(tmp_path / "in", seed=11, nodules=1, patient=PATIENT)
    truth = study["truth"][0]
    env = {
        k: v
        for k, v in cloud_env(home, hub.port, pki, device_key, central_keys["pub"]).items()
        if k.startswith("APPLIANCE_CLOUD__")
    }
    env.update(
        APPLIANCE_PIPELINE__ENABLED="true",
        APPLIANCE_ENGINES__INSTALL_REFERENCE_BUNDLES="true",
        APPLIANCE_ENGINES__BACKEND="ort",
    )
    with running_daemon(home, config_toml=_config(orthanc), env=env) as d:
        sent = storescu(d.port, study["files"])
        assert "Received Store Response (Success)" in sent.stdout, sent.stdout
        wait_until(
            lambda: sorted(t.get("Modality") for t in orthanc.instances_of_study(study["study_uid"])) == ["OT", "SR"],
            timeout=60,
            what="SR + SC in Orthanc",
        )
        msgs = wait_until(lambda: hub.messages(DEVICE, "result"), timeout=30, what="result message in the hub")

        # the cloud agent reports what the pipeline runs
        reported = wait_until(
            lambda: hub.twin(DEVICE)["reported"].get("bundles_active"), timeout=20, what="bundles reported"
        )
        assert {b["bundle_id"] for b in reported} == {"cxr-phantom", "mmg-phantom"}
        assert hub.twin(DEVICE)["reported"]["backend"] == "ort"

        # rollback with nothing to roll back to: a clear refusal, the pipeline keeps its model
        status, body = hub.invoke_method(DEVICE, "rollback_model", {"bundle_id": "cxr-phantom"})
        assert status == 409 and body["reason"] == "no_previous", body
        assert hub.invoke_method(DEVICE, "rollback_model", {})[0] == 400

        # resend by the pseudonym the central team sees: same message id again, PACS export re-queued
        meta, plain = crypto.decrypt(msgs[0].body, {"central-1": central_keys["priv"]})
        doc = json.loads(plain)
        status, body = hub.invoke_method(DEVICE, "resend", {"study_uid": doc["study_uid"]})
        assert status == 200 and body["results"] == 1 and body["exports_requeued"] == 2, body
        wait_until(lambda: len(hub.messages(DEVICE, "result")) == 2, timeout=20, what="resent message")
        assert hub.invoke_method(DEVICE, "resend", {"study_uid": "2.25.1"})[0] == 404
        wait_until(
            lambda: d.query("SELECT COUNT(*) AS n FROM exports WHERE state='done'")[0]["n"] == 2,
            timeout=20,
            what="re-export done",
        )
        assert len(orthanc.instances_of_study(study["study_uid"])) == 2  # same UIDs: nothing duplicated

    results = hub.messages(DEVICE, "result")
    assert len({m.props["$.mid"] for m in results}) == 1, "one cloud message per study revision and bundle"
    assert meta["mid"] == results[0].props["$.mid"] and meta["type"] == "result"
    # the decrypted payload is the findings, de-identified
    assert doc["bundle_id"] == "cxr-phantom" and doc["modality"] == "DX" and doc["revision"] == 1
    assert doc["deidentification"]["patient_identity_removed"] == "YES"
    nodule = next(f for f in doc["findings"] if f["label"] == "nodule")
    assert nodule["positive"]
    x, y = truth["findings"][0]["center_xy"]
    assert abs(nodule["location"]["row"] - y) <= 0.02 * truth["rows"]
    assert abs(nodule["location"]["col"] - x) <= 0.02 * truth["columns"]
    assert doc["images"][0]["rows"] == truth["rows"] and doc["images"][0]["columns"] == truth["columns"]
    # no PHI byte in anything the hub captured: telemetry bodies and properties, reported properties
    captured = b"".join(m.body + json.dumps(m.props).encode() for m in hub.messages())
    captured += json.dumps(hub.twin(DEVICE)).encode()
    phi = [
        PATIENT.name,
        PATIENT.name.replace("^", " "),
        PATIENT.patient_id,
        PATIENT.birth_date,
        PATIENT.accession,
        PATIENT.institution,
        study["study_uid"],
        truth["sop_instance_uid"],
    ]
    for value in phi:
        assert value.encode() not in captured, value
        assert value not in plain.decode(), value

    # the audit trail: the daemon's life, both PACS deliveries and the cloud's requests, chained, without PHI
    store = Store(home / "state.db")
    trail = [(e.event, e.actor, e.outcome) for e in audit.query(store, newest_first=False)]
    assert trail[0] == ("appliance_started", "system", "success"), trail
    assert trail[-1] == ("appliance_stopped", "system", "success"), trail
    assert trail.count(("export", "system", "success")) == 2, trail  # first delivery, then the resend
    assert ("model_rolled_back", "cloud", "failure") in trail and ("study_resend", "cloud", "success") in trail
    assert audit.verify(store) == []
    dump = json.dumps([e.as_dict() for e in audit.query(store)])
    for value in phi:
        assert value not in dump, value
