"""The bundle statistics of the real daemon: phantom studies sent with storescu, analysed by the reference
cxr-phantom bundle, then the ``send_stats`` direct method through the fake IoT Hub: the ``stats/v1`` message
arrives encrypted, decrypts, is strict JSON, counts what the stored results say, and carries no PHI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from appliance.cloud import crypto
from engines.reference.phantoms import PatientInfo, chest_study
from testsupport.cloud import DEVICE, cloud_env
from testsupport.common import wait_until
from testsupport.daemon import running_daemon
from testsupport.dcmtk import storescu
from testsupport.fakehub import FakeHub

pytestmark = pytest.mark.integration

PATIENTS = [
    PatientInfo(
        name="STATSTEST^WILHELMINA^Q",
        patient_id="PID-STATS-7001",
        birth_date="19611224",
        accession="ACC-STATS-3141",
        institution="Riverside Rural Clinic",
    ),
    PatientInfo(
        name="STATSTEST^BARTHOLOMEW",
        patient_id="PID-STATS-7002",
        birth_date="19770315",
        accession="ACC-STATS-2718",
        institution="Riverside Rural Clinic",
    ),
]


def _strict(raw: bytes) -> dict:
    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(raw, parse_constant=refuse)


def test_send_stats_reaches_the_hub_counts_the_results_and_carries_no_phi(
    home: Path, tmp_path: Path, hub: FakeHub, pki, device_key, central_keys
) -> None:
    sent_studies = [chest_study(tmp_path / "in", seed=31 + i, nodules=i, patient=p) for i, p in enumerate(PATIENTS)]
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
    with running_daemon(home, config_toml="[pipeline]\nenabled = true\npoll_s = 0.2\n", env=env) as d:
        for study in sent_studies:
            out = storescu(d.port, study["files"])
            assert "Received Store Response (Success)" in out.stdout, out.stdout
        wait_until(
            lambda: len(d.query("SELECT id FROM results WHERE summary NOT LIKE '%\"partial\"%'")) == 2,
            timeout=90,
            what="two results stored",
        )
        rows = d.query("SELECT summary FROM results")
        # the twin's reported drift property is there (the reference bundles ship no reference: nothing judged)
        wait_until(lambda: "drift" in hub.twin(DEVICE)["reported"], timeout=30, what="drift reported")
        assert hub.twin(DEVICE)["reported"]["drift"] == {}

        assert hub.invoke_method(DEVICE, "send_stats", {"day": "not-a-day"})[0] == 400
        assert hub.invoke_method(DEVICE, "send_stats", {"what": 1})[0] == 400
        status, body = hub.invoke_method(DEVICE, "send_stats", {})
        assert status == 200, body
        assert [(q["bundle_id"], q["final"]) for q in body["queued"]] == [("cxr-phantom", False)], body
        msgs = wait_until(lambda: hub.messages(DEVICE, "stats"), timeout=30, what="stats message in the hub")

    assert [m.props["$.mid"] for m in msgs] == [body["queued"][0]["message_id"]]
    meta, plain = crypto.decrypt(msgs[0].body, {"central-1": central_keys["priv"]})
    assert meta["type"] == "stats" and meta["schema"] == "stats/v1" and meta["device"] == DEVICE
    doc = _strict(plain)
    assert plain == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()  # compact sorted JSON

    # the counts, from the stored results (numpy over the summaries, not the stats code)
    summaries = [json.loads(r["summary"]) for r in rows]
    scores: dict[str, list[float]] = {}
    for s in summaries:
        for f in s["findings"]:
            scores.setdefault(f["label"], []).append(f["score"])
    edges = np.linspace(0.0, 1.0, 21)
    assert doc["bundle_id"] == "cxr-phantom" and doc["studies"] == 2 and doc["images"] == 2
    assert doc["final"] is False and len(doc["score_edges"]) == 21
    assert set(doc["scores"]) == set(scores)
    for label, values in scores.items():
        assert doc["scores"][label] == np.histogram(values, bins=edges)[0].tolist(), label
        assert doc["positives"][label] == sum(
            f["positive"] for s in summaries for f in s["findings"] if f["label"] == label
        )
    assert doc["study_score"] == np.histogram([s["study_score"] for s in summaries], bins=edges)[0].tolist()
    assert doc["inputs"]["manufacturer_model"] == {"Phantom Imaging (synthetic)|unknown": 2}
    assert doc["inputs"]["bits_stored"] == {"12": 2} and doc["inputs"]["photometric"] == {"MONOCHROME2": 2}
    assert doc["refusals"] == {} and doc["drift"] == {}

    # no identifying value of the studies sent in anything the hub captured (bodies, properties, the twin)
    captured = b"".join(m.body + json.dumps(m.props).encode() for m in hub.messages())
    captured += json.dumps(hub.twin(DEVICE)).encode() + plain
    phi: list[str] = []
    for p in PATIENTS:
        phi += [p.name, p.name.replace("^", " "), p.patient_id, p.birth_date, p.accession, p.institution]
    for study in sent_studies:
        phi += [study["study_uid"], *(t["sop_instance_uid"] for t in study["truth"]), "20240102"]  # study date
    for value in phi:
        assert value.encode() not in captured, value
