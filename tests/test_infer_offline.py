"""``run_offline``: folders of files -> findings report and SR/SC files (the engine of ``appliance infer``)."""

from __future__ import annotations

from pathlib import Path

import pydicom

from appliance.app.infer_offline import format_table, run_offline
from appliance.core.config import Settings
from appliance.pipeline.worker import StaticBundles
from testsupport.pipeline import TinyEngine, make_dataset, save, synthetic_image, tiny_manifest


def test_offline_inference_writes_results_and_reports(tmp_path: Path) -> None:
    src = tmp_path / "in"
    chest = make_dataset(synthetic_image(400, 300, (120, 200), radius=12))
    ct = make_dataset(synthetic_image(64, 64, None), modality="CT")
    save(chest, src / "a" / "chest.dcm")
    save(ct, src / "ct.dcm")
    (src / "notes.txt").write_text("not dicom")
    out = tmp_path / "out"
    bundles = StaticBundles([(tiny_manifest(), TinyEngine())])
    report = run_offline(Settings(state_dir=tmp_path / "home"), [src], out, bundles=bundles)
    by_uid = {s["study_uid"]: s for s in report["studies"]}
    assert by_uid[ct.StudyInstanceUID]["state"] == "no_model"
    res = by_uid[chest.StudyInstanceUID]["results"][0]
    nodule = res["findings"][0]
    assert nodule["positive"] and abs(nodule["location"]["row"] - 120) < 8 and abs(nodule["location"]["col"] - 200) < 6
    kinds = sorted(o["kind"] for o in res["objects"])
    assert kinds == ["SC", "SR"]
    for o in res["objects"]:
        assert pydicom.dcmread(o["path"]).StudyInstanceUID == chest.StudyInstanceUID
    assert report["errors"] and "notes.txt" in report["errors"][0]["path"]
    table = format_table(report)
    assert "POSITIVE" in table and "nodule" in table and "NOT FOR CLINICAL USE" in table


def test_broken_links_are_reported_and_an_empty_folder_says_so(tmp_path: Path) -> None:
    from appliance.app.infer_offline import collect

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "gone.dcm").symlink_to(tmp_path / "missing.dcm")
    assert collect([folder]) == [folder / "gone.dcm"]  # kept, so that reading it reports it
    empty = tmp_path / "empty"
    empty.mkdir()
    assert collect([empty]) == []
