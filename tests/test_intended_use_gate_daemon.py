"""The intended-use gate end to end (issue 16): the mammography reference model re-signed with its input contract
(``engines.contracts.reference_applies_to("mmg")``), installed with ``appliance model install``, then

- ``appliance infer --json``: a mixed study (CC views For Presentation, MLO views For Processing) is analysed on
  its CC views only, the MLO views named with their reason;
- the daemon (``/usr/bin/storescu`` in, Orthanc as the PACS): the same mixed study gets an SR and two SCs (none
  for a refused view) and its scores come from the CC views only; a study whose views are all For Processing ends
  ``not_analysed`` with one reason per image, and its "AI not applied" notice arrives in Orthanc and passes
  dciodvfy with no error.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from appliance.models.active import reference_bundles
from engines.contracts import reference_applies_to
from engines.reference.phantoms import mammo_study
from tests.test_bundle_trust import _resigned
from testsupport.bundles import demo_private_key
from testsupport.common import PYTHON, ROOT, wait_until
from testsupport.daemon import reference_pipeline_to_pacs, running_daemon
from testsupport.dcmtk import storescu
from testsupport.orthanc import AET, Orthanc

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed"),
]
MG_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
FOR_PROCESSING_REASON = (
    "Digital Mammography X-Ray Image Storage - For Processing (SOP Class UID) not taken: model takes Digital "
    "Mammography X-Ray Image Storage - For Presentation, Breast Projection X-Ray Image Storage - For Presentation"
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.update(PYTHONPATH=str(ROOT), APPLIANCE_ENGINES__TRUST_DEMO_KEY="true", **extra)
    env["APPLIANCE_ENGINES__INSTALL_REFERENCE_BUNDLES"] = "false"
    env["APPLIANCE_ENGINES__BACKEND"] = "ort"
    return env


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "appliance", "--home", str(home), *args],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _contract_bundle(tmp: Path) -> Path:
    mmg = next(p for p in reference_bundles() if p.name.startswith("mmg-phantom"))

    def edit(doc: dict) -> None:
        doc["applies_to"] = reference_applies_to("mmg")
        doc["version"] = "1.0.2-gate.1"

    return _resigned(mmg, tmp / "mmg-phantom-contract.bundle", demo_private_key(), edit)


def _study(tmp: Path, seed: int, processing: tuple[str, ...]) -> tuple[str, list[Path], dict[str, str]]:
    """A 4-view phantom mammogram, mass on the left; the views in ``processing`` ("LMLO", ...) made For
    Processing (their SOP class, PS3.4 B.5, and Presentation Intent Type). Returns (study UID, files,
    SOP Instance UID -> "LCC" ...)."""
    study = mammo_study(tmp / f"s{seed}", seed=seed, masses={"L": 1})
    names = {}
    files = []
    for f in study["files"]:
        ds = pydicom.dcmread(f)
        name = f"{ds.ImageLaterality}{ds.ViewPosition}"
        if name in processing:
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MG_FOR_PROCESSING
            ds.PresentationIntentType = "FOR PROCESSING"
            ds.save_as(f, enforce_file_format=True)
        names[str(ds.SOPInstanceUID)] = name
        files.append(Path(f))
    return study["study_uid"], files, names


def _dciodvfy_errors(data: bytes, tmp: Path, name: str) -> list[str]:
    path = tmp / name
    path.write_bytes(data)
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def test_gate_through_appliance_infer_and_the_daemon(home: Path, tmp_path: Path, orthanc: Orthanc) -> None:
    r = _cli(home, "model", "install", str(_contract_bundle(tmp_path)))
    assert r.returncode == 0, r.stderr
    listed = _cli(home, "model", "list", "--json")
    assert [b["input_contract"] for b in json.loads(listed.stdout)] == [True]

    mixed_uid, mixed, mixed_names = _study(tmp_path, 31, ("RMLO", "LMLO"))
    raw_uid, raw, raw_names = _study(tmp_path, 32, ("RCC", "LCC", "RMLO", "LMLO"))

    # offline: appliance infer
    r = _cli(home, "infer", str(mixed[0].parent), str(raw[0].parent), "--json")
    assert r.returncode == 0, r.stderr
    by_uid = {s["study_uid"]: s for s in json.loads(r.stdout)["studies"]}
    (result,) = by_uid[mixed_uid]["results"]
    assert {mixed_names[f["image_sop_uid"]] for f in result["findings"]} == {"RCC", "LCC"}
    assert {mixed_names[n["image_sop_uid"]]: n["reason"] for n in result["not_applied"]} == {
        "RMLO": FOR_PROCESSING_REASON,
        "LMLO": FOR_PROCESSING_REASON,
    }
    cc_scores = {mixed_names[f["image_sop_uid"]]: f["score"] for f in result["findings"]}
    assert result["per_breast"] == pytest.approx({"R": cc_scores["RCC"], "L": cc_scores["LCC"]}, abs=1e-6)
    assert by_uid[raw_uid]["state"] == "not_analysed" and by_uid[raw_uid]["results"] == []
    assert by_uid[raw_uid]["reason"].startswith("AI not applied: mmg-phantom: 4 images")

    # the daemon: storescu in, Orthanc as the PACS
    cfg, env = reference_pipeline_to_pacs(orthanc.dicom_port, AET)
    env["APPLIANCE_ENGINES__INSTALL_REFERENCE_BUNDLES"] = "false"
    with running_daemon(home, config_toml=cfg, env=env) as d:
        for files in (mixed, raw):
            sent = storescu(d.port, [str(f) for f in files])
            assert sent.stdout.count("Received Store Response (Success)") == len(files), sent.stdout

        (row,) = wait_until(lambda: d.studies("not_analysed"), timeout=120, what="the For Processing study")
        assert row["detail"].startswith("AI not applied: mmg-phantom: 4 images …")
        assert row["detail"].endswith(FOR_PROCESSING_REASON)

        def notice_in_pacs() -> list[dict] | None:
            tags = orthanc.instances_of_study(raw_uid)
            return tags if len(tags) == 1 else None

        (notice,) = wait_until(notice_in_pacs, timeout=60, interval=0.3, what="the notice in Orthanc")
        data = orthanc.instance_file(notice["_id"])
        ds = pydicom.dcmread(io.BytesIO(data))
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and ds.SeriesDescription.startswith("AI not applied")
        assert ds.BurnedInAnnotation == "YES" and ds.PatientName == pydicom.dcmread(raw[0]).PatientName
        assert FOR_PROCESSING_REASON in ds.DerivationDescription
        assert _dciodvfy_errors(data, tmp_path, "notice.dcm") == []

        def results_in_pacs() -> list[dict] | None:
            tags = orthanc.instances_of_study(mixed_uid)
            return tags if sorted(t.get("Modality") for t in tags) == ["OT"] * 2 + ["SR"] else None

        tags = wait_until(results_in_pacs, timeout=120, interval=0.3, what="SR + 2 SC in Orthanc")
        for t in tags:
            assert _dciodvfy_errors(orthanc.instance_file(t["_id"]), tmp_path, f"{t['_id']}.dcm") == []
        sr = pydicom.dcmread(io.BytesIO(orthanc.instance_file(next(t["_id"] for t in tags if t["Modality"] == "SR"))))
        evidence = {
            str(ref.ReferencedSOPInstanceUID)
            for st in sr.CurrentRequestedProcedureEvidenceSequence
            for se in st.ReferencedSeriesSequence
            for ref in se.ReferencedSOPSequence
        }
        assert {mixed_names[u] for u in evidence} == {"RCC", "LCC"}
        summary = json.loads(d.query("SELECT summary FROM results WHERE study_uid=?", (mixed_uid,))[0]["summary"])
        assert {mixed_names[f["image_sop_uid"]] for f in summary["findings"]} == {"RCC", "LCC"}
        assert str(pydicom.dcmread(raw[0]).PatientName) not in d.logs()
