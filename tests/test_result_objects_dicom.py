"""Result objects with real parts (issue 10, item 4): dciodvfy over everything the box writes, and the field
cases ``cr_without_patient_orientation`` and ``patient_name_iso2022_japanese`` with their family, offline
(``appliance infer``) and through the daemon (dcmtk storescu in, Orthanc as the PACS).

- Every SR and SC built by the reference bundles from the phantoms (``engines.reference.phantoms``) and from
  every field case in ``tests/cases`` passes dciodvfy (dicom3tools) with no ``Error`` line.
- The SR and SC of each case are written, with the source's Specific Character Set, Patient's Name
  (byte for byte) and Patient Orientation (empty where the source has none or an empty one).
In-process checks of the same rules over every character set: ``tests/test_result_objects.py``.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from appliance.app.infer_offline import run_offline
from appliance.core.config import Settings
from appliance.models.active import ActiveEngines
from appliance.pipeline.analyse import analyse
from appliance.pipeline.results_sc import build_sc
from appliance.pipeline.results_source import UNPAIRED_BODY_PARTS, series_laterality
from engines.reference.phantoms import PatientInfo, chest_phantom, chest_study, mammo_study, to_dicom, write_dicom
from testsupport.common import ROOT, wait_until
from testsupport.daemon import daemon_env, reference_pipeline_to_pacs, running_daemon
from testsupport.dcmtk import storescu
from testsupport.orthanc import AET, Orthanc
from testsupport.pipeline import TinyEngine, make_dataset, synthetic_image, tiny_manifest
from testsupport.reference import CASES, reference_engines, write_case

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed"),
]

JAPANESE = "Yamada^Tarou=山田^太郎=やまだ^たろう"
# the two field cases and members of their families: (case script + args) or (charset, name, orientation)
FAMILY: dict[str, tuple[Any, str, Any]] = {
    "korean-ir149": (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동", ["L", "F"]),
    # R\F: a chest stored flipped left-right (the model takes it reoriented; an oblique A\FR chest is refused)
    "japanese-ir13-ir87": (["ISO 2022 IR 13", "ISO 2022 IR 87"], "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう", ["R", "F"]),
    "utf8": ("ISO_IR 192", "Wang^XiaoDong=王^小東", None),
    "latin1-empty-orientation": ("ISO_IR 100", "Buc^Jérôme", ""),
}


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines dciodvfy (dicom3tools) reports for one file."""
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def family_member(name: str, out: Path) -> Path:
    """A CR chest with a nodule like the field cases, its identity in another character set."""
    charset, patient_name, orientation = FAMILY[name]
    ph = chest_phantom(320, 256, seed=1, nodules=1)
    ds = to_dicom(ph.pixels, modality="CR", patient=PatientInfo(name="X", patient_id=f"F-{name}"[:16]))
    ds.SpecificCharacterSet = charset
    ds.PatientName = patient_name
    if orientation is not None:
        ds.PatientOrientation = orientation
    return write_dicom(ds, out)


def distinct_study(path: Path, suffix: str) -> Path:
    """Give the file its own study, series and SOP Instance UIDs (a case script written twice with different
    arguments makes the same UIDs)."""
    ds = pydicom.dcmread(path)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(ds, keyword, generate_uid(entropy_srcs=[str(getattr(ds, keyword)), suffix]))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


def orientation_cases(folder: Path) -> dict[str, Path]:
    """``cr_without_patient_orientation`` as written (absent) and with ``empty``, and the Japanese case."""
    return {
        "absent": write_case("cr_without_patient_orientation", folder / "absent.dcm"),
        "empty": distinct_study(write_case("cr_without_patient_orientation", folder / "empty.dcm", "empty"), "2"),
        "japanese": write_case("patient_name_iso2022_japanese", folder / "japanese.dcm"),
    }


def _case_inputs(tmp: Path) -> dict[str, Path]:
    """Every field case (tests/cases) and the family members, written under ``tmp``; name -> file or folder."""
    inputs: dict[str, Path] = {}
    for script in sorted(CASES.glob("*.py")):
        folder_cases = ("mg_view_only_in_code_sequence", "duplicate_sop_uid_two_series")
        target = tmp / script.stem if script.stem in folder_cases else tmp / f"{script.stem}.dcm"
        inputs[script.stem] = write_case(script.stem, target)
    inputs["cr_without_patient_orientation-empty"] = distinct_study(
        write_case("cr_without_patient_orientation", tmp / "cr_without_patient_orientation-empty.dcm", "empty"), "2"
    )
    for name in FAMILY:
        inputs[name] = family_member(name, tmp / f"{name}.dcm")
    return inputs


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, ActiveEngines]]:
    settings, engines = reference_engines(tmp_path_factory.mktemp("home"))
    yield settings, engines
    engines.close()


def _objects(report: dict[str, Any]) -> list[dict[str, str]]:
    return [o for st in report["studies"] for res in st["results"] for o in res.get("objects", [])]


def test_every_sr_and_sc_from_phantoms_and_cases_passes_dciodvfy(
    tmp_path: Path, reference: tuple[Settings, ActiveEngines]
) -> None:
    settings, engines = reference
    src = tmp_path / "in"
    chest_study(src, seed=3)
    chest_study(src, seed=4, nodules=0, modality="CR")
    chest_study(src, seed=5, photometric="MONOCHROME1")
    mammo_study(src, seed=6, masses={"L": 1})
    mammo_study(src, seed=7, masses={"R": 1}, photometric="MONOCHROME1")
    inputs = _case_inputs(tmp_path / "cases")
    report = run_offline(settings, [src, *inputs.values()], tmp_path / "out", bundles=engines)
    objects = _objects(report)
    kinds = [o["kind"] for o in objects]
    # 3 chests + 2 mammograms + the cases: one SR per study, one SC per image
    assert kinds.count("SR") >= 5 + 2 and kinds.count("SC") >= 3 + 8 + 2, kinds
    errors = {o["path"]: e for o in objects if (e := dciodvfy_errors(Path(o["path"])))}
    assert not errors, json.dumps(errors, indent=1, ensure_ascii=False)


def _check_copied(obj: pydicom.Dataset, src: pydicom.Dataset) -> None:
    """Specific Character Set, Patient's Name (bytes and groups), Patient ID as in the source."""
    assert obj.get("SpecificCharacterSet") == src.get("SpecificCharacterSet"), obj.Modality
    assert obj["PatientName"].value.original_string == src["PatientName"].value.original_string, obj.Modality
    assert str(obj.PatientName) == str(src.PatientName)
    assert obj.PatientID == src.PatientID
    if obj.Modality == "OT":  # the SC: Patient Orientation as the source's, Type 2 (present, maybe empty)
        assert "PatientOrientation" in obj
        expected = list(src.PatientOrientation) if len(src.get("PatientOrientation") or []) == 2 else []
        assert list(obj.PatientOrientation or []) == expected


def test_cases_offline_with_appliance_infer(tmp_path: Path) -> None:
    """The two cases and their family through the real CLI: each study's SR and SC are written, exact copies."""
    (tmp_path / "in").mkdir()
    inputs = {
        **orientation_cases(tmp_path / "in"),
        **{n: family_member(n, tmp_path / "in" / f"{n}.dcm") for n in FAMILY},
    }
    out = tmp_path / "out"
    cfg = tmp_path / "a.toml"
    cfg.write_text('[engines]\nbackend = "ort"\n')
    run = subprocess.run(
        [sys.executable, "-m", "appliance", "--home", str(tmp_path / "home"), "-c", str(cfg), "infer"]
        + [str(tmp_path / "in"), "--out", str(out), "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=daemon_env({"APPLIANCE_ENGINES__INSTALL_REFERENCE_BUNDLES": "true"}),
    )
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["errors"] == []
    by_study = {st["study_uid"]: st for st in report["studies"]}
    for name, path in inputs.items():
        src = pydicom.dcmread(path)
        (res,) = by_study[src.StudyInstanceUID]["results"]
        assert sorted(o["kind"] for o in res["objects"]) == ["SC", "SR"], name
        assert "object_errors" not in res, name
        for o in res["objects"]:
            _check_copied(pydicom.dcmread(o["path"]), src)
    japanese = pydicom.dcmread(inputs["japanese"])
    assert str(japanese.PatientName) == JAPANESE and japanese.SpecificCharacterSet == ["", "ISO 2022 IR 87"]


def test_cases_through_the_daemon_to_orthanc(home: Path, tmp_path: Path, orthanc: Orthanc) -> None:
    """storescu -> daemon (reference bundles) -> Orthanc: every study reaches ``exported`` with its SR and SC
    in the PACS, and what Orthanc returns carries the source's character set, name and orientation."""
    (tmp_path / "in").mkdir()
    inputs = [
        *orientation_cases(tmp_path / "in").values(),
        *(family_member(n, tmp_path / "in" / f"{n}.dcm") for n in FAMILY),
    ]
    sources = [pydicom.dcmread(p) for p in inputs]
    config, env = reference_pipeline_to_pacs(orthanc.dicom_port, AET)
    with running_daemon(home, config_toml=config, env=env) as d:
        sent = storescu(d.port, [str(p) for p in inputs])
        assert sent.stdout.count("Received Store Response (Success)") == len(inputs), sent.stdout
        n = len({s.StudyInstanceUID for s in sources})
        wait_until(lambda: len(d.studies("exported")) == n, timeout=180, interval=0.5, what=f"{n} studies exported")
        states = {r["study_uid"]: r["state"] for r in d.studies()}
        assert set(states.values()) == {"exported"}, states
    for src in sources:
        tags = orthanc.instances_of_study(str(src.StudyInstanceUID))
        kinds = sorted(t.get("Modality") for t in tags)
        assert kinds == ["OT", "SR"], (src.PatientID, kinds)
        for t in tags:
            obj = pydicom.dcmread(io.BytesIO(orthanc.instance_file(t["_id"])))
            _check_copied(obj, src)


@pytest.mark.parametrize("body_part", [*sorted(UNPAIRED_BODY_PARTS), "BREAST", "KNEE", "HAND", "", None])
@pytest.mark.parametrize("side", ["L", None])
def test_sc_series_laterality_passes_dciodvfy_for_every_body_part(
    tmp_path: Path, body_part: str | None, side: str | None
) -> None:
    """General Series Laterality (PS3.3 C.7.3.1, Type 2C) as :func:`series_laterality` sets it, for every
    unpaired Body Part Examined of PS3.16 Annex L, paired ones and none: dciodvfy finds no error."""
    engine = TinyEngine()
    src = make_dataset(synthetic_image(200, 160, (80, 90), radius=10), laterality=side)
    if body_part is None:
        del src.BodyPartExamined
    else:
        src.BodyPartExamined = body_part
    m = tiny_manifest()
    a = analyse([src], m, engine.infer, engine.max_batch, 10**8)
    sc = build_sc(a.result.images[0], src, a.prepared[0].display, a.result, 0)
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    assert sc.get("Laterality") == series_laterality(body_part, side)
    assert dciodvfy_errors(path) == []
