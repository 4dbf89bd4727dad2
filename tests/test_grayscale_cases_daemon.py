"""The grayscale field cases through the real chain: dcmtk ``storescu`` -> the daemon (reference bundles, ONNX
Runtime) -> Orthanc as the PACS. The right outcomes are the case scripts' (``../shared/cases``):

- ``voi_lut_narrow_output``: a VOI LUT whose data use 12 bits while its descriptor says 16 gives full
  contrast, so the nodule is found and no false effusion is reported;
- ``mg_monochrome2_presentation_inverse``: Presentation LUT Shape INVERSE is applied, so the mass is reported
  with the same score as the control written conventionally (MONOCHROME2, IDENTITY).
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from testsupport.common import wait_until
from testsupport.daemon import reference_pipeline_to_pacs, running_daemon
from testsupport.dcmtk import storescu
from testsupport.orthanc import AET, Orthanc
from testsupport.reference import write_case

pytestmark = pytest.mark.integration


def _summary(d, study_uid: str) -> dict:
    rows = d.query("SELECT summary FROM results WHERE study_uid=?", (study_uid,))
    return json.loads(rows[0]["summary"])


def _positives(summary: dict) -> dict[str, float]:
    return {f["label"]: f["score"] for f in summary["findings"] if f["positive"]}


def test_grayscale_cases_through_the_daemon_reach_the_pacs_with_the_right_findings(
    home: Path, tmp_path: Path, orthanc: Orthanc
) -> None:
    voi = write_case("voi_lut_narrow_output", tmp_path / "voi.dcm")
    inverse = write_case("mg_monochrome2_presentation_inverse", tmp_path / "inverse.dcm")
    control = write_case("mg_monochrome2_presentation_inverse", tmp_path / "control.dcm", "control")
    ds = pydicom.dcmread(control)  # the control shares the case's UIDs: make it a study of its own
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(control, enforce_file_format=True)
    uids = {p: str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in (voi, inverse, control)}
    assert len(set(uids.values())) == 3  # three studies
    cfg, env = reference_pipeline_to_pacs(orthanc.dicom_port, AET)
    with running_daemon(home, config_toml=cfg, env=env) as d:
        for path in (voi, inverse, control):
            sent = storescu(d.port, [str(path)])
            assert "Received Store Response (Success)" in sent.stdout, sent.stdout
        wait_until(lambda: len(d.studies("exported")) == 3, timeout=180, interval=0.5, what="three studies exported")
        for uid in uids.values():  # SR + one SC of each study reached the PACS
            mods = sorted(t.get("Modality") for t in orthanc.instances_of_study(uid))
            assert mods == ["OT", "SR"], (uid, mods)

        voi_found = _positives(_summary(d, uids[voi]))
        assert set(voi_found) == {"nodule"}, voi_found  # no false effusion
        assert voi_found["nodule"] > 0.3

        got, want = _positives(_summary(d, uids[inverse])), _positives(_summary(d, uids[control]))
        assert "mass" in got and "mass" in want, (got, want)
        assert abs(got["mass"] - want["mass"]) < 1e-3
