"""The CLI for people against a running appliance: a phantom chest sent with dcmtk's storescu, analysed by the
reference bundles, delivered to Orthanc; then ``appliance studies`` (80 columns, filters, --wide, --json),
``appliance study show``, ``study retry`` and ``study resend`` while the daemon runs, and ``appliance status``."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from appliance.lifecycle.studies import EXPORTED
from appliance.pipeline.results_sc import URGENT_YELLOW
from appliance.pipeline.results_sr import PRIORITY, URGENT
from engines import bundle as B
from engines.golden import reference_outputs, save_golden
from engines.keys import TrustStore, generate_private_key, key_id, public_key_b64
from engines.reference.phantoms import PatientInfo, chest_study
from engines.runtime import install_bundle
from testsupport.common import wait_until
from testsupport.daemon import appliance_cli, reference_pipeline_to_pacs, running_daemon
from testsupport.dcmtk import storescu
from testsupport.orthanc import AET, Orthanc
from testsupport.pipeline import SIZE, make_dataset, save, synthetic_image, tiny_manifest, tiny_model_bytes

pytestmark = pytest.mark.integration

PATIENT = PatientInfo(name="PHANTOM^JANE^Q", patient_id="PH-424242", accession="ACC777001")


def _cli(d, *args: str, columns: int = 80):
    """``appliance ARGS`` with the daemon's environment and config file (``start_daemon`` wrote it beside home)."""
    config = d.home.parent / f"{d.home.name}.toml"
    return appliance_cli(
        d.home, *args, env={**d.env, "COLUMNS": str(columns), "APPLIANCE_CONFIG": str(config)}, timeout=60
    )


def test_worklist_show_retry_resend_and_status_against_a_running_appliance(
    home: Path, tmp_path: Path, orthanc: Orthanc
) -> None:
    study = chest_study(tmp_path / "in", seed=31, nodules=1, patient=PATIENT)
    uid = study["study_uid"]
    cfg, env = reference_pipeline_to_pacs(orthanc.dicom_port, AET)
    with running_daemon(home, config_toml=cfg, env=env) as d:
        sent = storescu(d.port, study["files"])
        assert sent.returncode == 0, sent.stdout
        (row,) = wait_until(lambda: d.studies(EXPORTED), timeout=120, what="exported")
        sid = row["id"]
        in_pacs = sorted(t["SOPInstanceUID"] for t in orthanc.instances_of_study(uid) if t["Modality"] in ("SR", "OT"))
        assert len(in_pacs) == 2

        # the worklist at 80 columns: one line per study, patient ID and name, accession, finding, short UID
        table = _cli(d, "studies")
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert all(len(line) <= 80 for line in lines), table.stdout
        (line,) = [x for x in lines if x.strip().startswith(str(sid))]
        assert "PH-424242" in line and "ACC777001" in line and EXPORTED in line and "nodule" in line
        assert uid[-9:] in line and uid not in line  # the end of the UID, not all of it
        wide = _cli(d, "studies", "--wide", columns=250)
        assert uid in wide.stdout and "PH-424242 PHANTOM, JANE Q" in wide.stdout  # the name as people read it

        listed = json.loads(_cli(d, "studies", "--json").stdout)
        (s,) = listed
        assert (s["id"], s["study_uid"], s["state"], s["patient_id"], s["accession_number"]) == (
            sid,
            uid,
            EXPORTED,
            "PH-424242",
            "ACC777001",
        )
        assert s["patient_name"] == "PHANTOM^JANE^Q" and s["images"] == 1
        nodule = next(f for f in s["findings"] if f["label"] == "nodule")
        assert nodule["bundle_id"] == "cxr-phantom" and nodule["positive"] and nodule["score"] >= nodule["threshold"]
        today = time.strftime("%Y-%m-%d")
        assert [x["id"] for x in json.loads(_cli(d, "studies", "--today", "--json").stdout)] == [sid]
        assert json.loads(_cli(d, "studies", "--since", "2000-01-01", "--until", "2000-12-31", "--json").stdout) == []
        assert [x["id"] for x in json.loads(_cli(d, "studies", "--since", today, "--json").stdout)] == [sid]
        assert [x["id"] for x in json.loads(_cli(d, "studies", "--finding", "nodule", "--json").stdout)] == [sid]
        assert json.loads(_cli(d, "studies", "--finding", "cardiomegaly", "--json").stdout) == []
        assert json.loads(_cli(d, "studies", "--urgent", "--json").stdout) == []  # 1.0.2 marks nothing urgent
        bad = _cli(d, "studies", "--state", "bogus")
        assert bad.returncode == 2 and "unknown state" in bad.stderr
        bad = _cli(d, "studies", "--since", "yesterday")
        assert bad.returncode == 2

        # one study, by the end of its UID as the worklist shows it
        shown = _cli(d, "study", "show", uid[-9:], "--json")
        assert shown.returncode == 0, shown.stderr
        detail = json.loads(shown.stdout)
        assert detail["summary"]["id"] == sid
        (image,) = detail["images"]
        assert image["sop_instance_uid"] == study["truth"][0]["sop_instance_uid"]
        assert [o["kind"] for o in image["objects"]] == ["SC"] and image["objects"][0]["exported"]
        assert [o["kind"] for o in detail["study_objects"]] == ["SR"] and detail["study_objects"][0]["exported"]
        whats = [t["what"] for t in detail["timeline"]]
        assert whats[:3] == ["received", "complete", "inferring"] and whats[-1] == EXPORTED and "exported" in whats
        text = _cli(d, "study", "show", str(sid), columns=120)
        assert "PHANTOM, JANE Q / PH-424242" in text.stdout and "timeline" in text.stdout
        missing = _cli(d, "study", "show", "9.9.9.9")
        assert missing.returncode == 1 and "no study matches" in missing.stderr

        # retry: analysed again by the running worker, delivered again, nothing duplicated in the PACS
        retried = _cli(d, "study", "retry", str(sid))
        assert retried.returncode == 0 and "complete" in retried.stdout, retried.stderr
        wait_until(
            lambda: (
                len(d.query("SELECT id FROM study_events WHERE study_id=? AND to_state='inferring'", (sid,))) == 2
                and d.studies(EXPORTED)
            ),
            timeout=120,
            what="analysed again and exported",
        )
        again = sorted(t["SOPInstanceUID"] for t in orthanc.instances_of_study(uid) if t["Modality"] in ("SR", "OT"))
        assert again == in_pacs

        # resend: every object goes to the PACS again (export rows acknowledged again after the request)
        asked = time.time()
        resent = _cli(d, "study", "resend", uid)
        assert resent.returncode == 0 and "2 result object(s) queued for pacs" in resent.stdout, resent.stderr
        wait_until(
            lambda: (
                d.studies(EXPORTED)
                and all(r["done_at"] and r["done_at"] >= asked for r in d.query("SELECT done_at FROM exports"))
            ),
            timeout=60,
            what="resent and acknowledged",
        )
        events = [r["to_state"] for r in d.query("SELECT to_state FROM study_events WHERE study_id=?", (sid,))]
        assert events[-2:] == ["inferred", EXPORTED]  # exported -> inferred (resend) -> exported
        audit = d.query("SELECT event, actor, subject FROM audit_log ORDER BY seq")
        mine = [(r["event"], r["subject"]) for r in audit if r["actor"].startswith("cli:")]
        assert ("study_retry", f"study:{sid}") in mine and ("study_resend", f"study:{sid}") in mine
        assert ("study_viewed", f"study:{sid}") in mine

        # status: listener, cloud off, nothing pending, the demo key named as a problem, a destination present
        status = json.loads(_cli(d, "status", "--json").stdout)
        assert status["running"] and status["dicom"]["listening"] and status["dicom"]["port"] == d.port
        assert status["cloud"] == {"enabled": False, "hub": None, "device_id": None, "problems": []}
        assert status["exports"]["pending"] == 0 and status["outbox"]["depth"] == 0
        keys = [p["key"] for p in status["problems"]]
        assert "engines.trust_demo_key" in keys and "pipeline.destinations" not in keys
        plain = _cli(d, "status")
        assert "exports to PACS: none pending" in plain.stdout and "PROBLEMS" in plain.stdout
        assert "cloud: off" in plain.stdout


def test_an_urgent_study_end_to_end_banner_and_sr_flag_in_the_pacs(
    home: Path, tmp_path: Path, orthanc: Orthanc
) -> None:
    """A signed bundle whose manifest marks its label urgent, installed like any bundle: the phantom study is
    listed by ``appliance studies --urgent``, and what the PACS receives carries the flag (SC banner, SR code)."""
    work = tmp_path / "bundle"
    work.mkdir()
    model = work / "model.onnx"
    model.write_bytes(tiny_model_bytes())
    inputs = {"image": np.random.default_rng(0).random((2, 1, SIZE, SIZE), dtype=np.float32)}
    save_golden(work / "golden.npz", inputs, reference_outputs(model, inputs))
    doc = tiny_manifest().model_dump(mode="json")
    for k in ("files", "created", "schema_version", "min_appliance_version"):
        doc.pop(k, None)
    doc["urgent"] = {"nodule": 0.3}
    path = work / "tiny-urgent.bundle"
    B.build_bundle(path, doc, {"model.onnx": model, "golden.npz": work / "golden.npz"})
    key = generate_private_key()
    B.sign_bundle(path, key)
    kid, pub = key_id(key), public_key_b64(key)
    install_bundle(home / "models", path, TrustStore.from_config({kid: pub}))
    cfg = (
        f'[engines]\ntrusted_keys = {{ "{kid}" = "{pub}" }}\n'
        "[pipeline]\nenabled = true\npoll_s = 0.2\nretry_initial_s = 0.5\n"
        f'[[pipeline.destinations]]\nname = "pacs"\nae_title = "{AET}"\nhost = "127.0.0.1"\n'
        f"port = {orthanc.dicom_port}\n"
    )
    ds = make_dataset(synthetic_image(600, 500, (200, 300), radius=20))
    with running_daemon(home, config_toml=cfg, env={"APPLIANCE_PIPELINE__ENABLED": "true"}) as d:
        assert storescu(d.port, [save(ds, tmp_path / "in" / "a.dcm")]).returncode == 0
        (row,) = wait_until(lambda: d.studies(EXPORTED), timeout=120, what="exported")
        (listed,) = json.loads(_cli(d, "studies", "--urgent", "--json").stdout)
        assert listed["id"] == row["id"] and listed["urgent"] and listed["findings"][0]["urgent"]
        assert "URGENT nodule" in _cli(d, "studies").stdout
    tags = {t["Modality"]: t for t in orthanc.instances_of_study(ds.StudyInstanceUID)}
    sc = pydicom.dcmread(io.BytesIO(orthanc.instance_file(tags["OT"]["_id"])))
    assert tuple(sc.pixel_array[1, 1]) == URGENT_YELLOW
    sr = pydicom.dcmread(io.BytesIO(orthanc.instance_file(tags["SR"]["_id"])))
    flags: list[tuple[str, str]] = []

    def walk(items) -> None:
        for item in items:
            if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeValue == PRIORITY.value:
                flags.append(
                    (item.ConceptCodeSequence[0].CodingSchemeDesignator, item.ConceptCodeSequence[0].CodeValue)
                )
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    assert flags == [("SCT", URGENT.value)] * 2  # the finding's group and the study group
