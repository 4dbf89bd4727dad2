"""Result objects copy their source exactly and never block a run (issue 10, item 4), in process.

- Every Specific Character Set form of PS3.5 (single-byte, multi-valued ISO 2022 with escape sequences,
  UTF-8, GB18030) gives an SR and an SC with the source's Specific Character Set and the Patient's Name,
  Referring Physician's Name, Study Description and Institution Name byte for byte (PS3.5 6.1, the
  examples of PS3.5 Annexes H, I, J; PS3.3 C.12.1.1.2); a value that is not a defined term -> ISO_IR 192.
- Patient Orientation present (compound values), empty and absent: the SC carries the same (Type 2).
- ``run_offline`` goes on past a file that is not DICOM, a study whose analysis raises, and result objects
  whose builders raise, and reports each per file.
dciodvfy over real outputs and the field cases through ``appliance infer`` and the daemon:
``tests/test_result_objects_dicom.py``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

from appliance.app import infer_offline
from appliance.app.infer_offline import format_table, run_offline
from appliance.core.config import Settings
from appliance.pipeline import results
from appliance.pipeline.analyse import Analysis, analyse
from appliance.pipeline.results_sc import build_sc
from appliance.pipeline.results_source import UTF8, patient_orientation, result_character_set, series_laterality
from appliance.pipeline.results_sr import build_sr
from appliance.pipeline.worker import StaticBundles
from testsupport.pipeline import TinyEngine, make_dataset, save, synthetic_image, tiny_manifest

# (Specific Character Set, Patient's Name, a text): PS3.5 Annex H (Japanese), I (Korean), J (Chinese) and
# single-byte sets of PS3.3 Table C.12-2
CHARSETS: dict[str, tuple[Any, str, str]] = {
    "default": (None, "Doe^John", "Chest PA"),
    "latin1": ("ISO_IR 100", "Buc^Jérôme", "Thorax poumon côté"),
    "greek": ("ISO_IR 126", "Διονυσιος", "Θώρακας"),
    "cyrillic": ("ISO_IR 144", "Люкceмбypг", "Грудная клетка"),
    "hebrew": ("ISO_IR 138", "שרון^דבורה", "חזה"),
    "arabic": ("ISO_IR 127", "قباني^لنزار", "صدر"),
    "thai": ("ISO_IR 166", "ประเทศไทย^พระนคร", "ทรวงอก"),
    "jis-x-0201": ("ISO_IR 13", "ﾔﾏﾀﾞ^ﾀﾛｳ", "ｷｮｳﾌﾞ"),
    "utf8": ("ISO_IR 192", "Wang^XiaoDong=王^小東", "胸部"),
    "gb18030": ("GB18030", "Wang^XiaoDong=王^小东", "胸部"),
    "iso2022-ir87": (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう", "山田病院"),
    "iso2022-ir13-ir87": (["ISO 2022 IR 13", "ISO 2022 IR 87"], "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう", "山田病院"),
    "iso2022-ir87-ir159": (["", "ISO 2022 IR 87", "ISO 2022 IR 159"], "Yamada^Tarou=山田^太郎=やまだ^たろう", "胸部"),
    "iso2022-ir149": (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동", "흉부"),
    "iso2022-ir6-ir100": (["ISO 2022 IR 6", "ISO 2022 IR 100"], "Buc^Jérôme", "Thorax"),
}


@pytest.fixture(scope="module")
def engine() -> TinyEngine:
    return TinyEngine()


def _roundtrip(ds: Dataset) -> pydicom.FileDataset:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def _source(charset: Any, name: str, text: str, **changes: Any) -> pydicom.FileDataset:
    """A DX chest with a nodule, its identity in ``charset``, read back from its Part 10 bytes."""
    ds = make_dataset(synthetic_image(300, 240, (100, 120), radius=12))
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.PatientName = name
    ds.ReferringPhysicianName = name
    ds.StudyDescription = text
    ds.InstitutionName = text
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return _roundtrip(ds)


def _objects(engine: TinyEngine, src: Dataset) -> tuple[Analysis, pydicom.FileDataset, pydicom.FileDataset]:
    m = tiny_manifest()
    a = analyse([src], m, engine.infer, engine.max_batch, 10**8)
    sr = _roundtrip(build_sr(a.result, a.sources, m.title))
    sc = _roundtrip(build_sc(a.result.images[0], src, a.prepared[0].display, a.result, 0))
    return a, sr, sc


def _raw(ds: Dataset, keyword: str) -> bytes:
    """The value of ``keyword`` as encoded in the file (PN: pydicom keeps the bytes it decoded)."""
    return bytes(ds[keyword].value.original_string)


@pytest.mark.parametrize("member", list(CHARSETS))
def test_sr_and_sc_copy_character_set_and_names_exactly(engine: TinyEngine, member: str) -> None:
    charset, name, text = CHARSETS[member]
    src = _source(charset, name, text)
    _, sr, sc = _objects(engine, src)
    for obj in (sr, sc):
        assert obj.get("SpecificCharacterSet") == src.get("SpecificCharacterSet"), obj.Modality
        for kw in ("PatientName", "ReferringPhysicianName"):
            assert _raw(obj, kw) == _raw(src, kw), (obj.Modality, kw)
            assert str(obj[kw].value) == name
        pn = obj.PatientName
        assert (pn.alphabetic, pn.ideographic, pn.phonetic) == (
            src.PatientName.alphabetic,
            src.PatientName.ideographic,
            src.PatientName.phonetic,
        )
        assert obj.StudyDescription == text
        assert obj.ContributingEquipmentSequence[0].InstitutionName == text  # the modality, as acquisition equipment
        for kw in ("PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate"):
            assert obj[kw].value == src[kw].value, kw


def test_case_iso2022_japanese_name_in_escape_sequences(engine: TinyEngine) -> None:
    """The field case: ``\\ISO 2022 IR 87``, name and institution in JIS X 0208 between ESC $ B and ESC ( B."""
    src = _source(["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう", "山田病院")
    _, sr, sc = _objects(engine, src)
    expected = b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B"
    for obj in (sr, sc):
        assert obj.SpecificCharacterSet == ["", "ISO 2022 IR 87"]
        assert _raw(obj, "PatientName") == expected


def test_iso2022_ir58_bytes_of_ps3_5_example_are_kept(engine: TinyEngine) -> None:
    r"""PS3.5 J.3 (``\ISO 2022 IR 58``, GB 2312 designated to G1 by ESC $ ) A): pydicom decodes it leaving the
    escape sequences in the text, so what matters is that the results carry the source's bytes unchanged."""
    example = b"Zhang^XiaoDong=\x1b$)A\xd5\xc5^\x1b$)A\xd0\xa1\xb6\xab"
    src = _source(["", "ISO 2022 IR 58"], "X", "Chest", PatientName=example)
    assert _raw(src, "PatientName") == example
    _, sr, sc = _objects(engine, src)
    for obj in (sr, sc):
        assert obj.SpecificCharacterSet == ["", "ISO 2022 IR 58"] and _raw(obj, "PatientName") == example


def test_character_set_that_is_not_a_defined_term_becomes_utf8(engine: TinyEngine) -> None:
    """``ISO-IR 100`` (a common misspelling pydicom reads as ISO_IR 100): the results say ISO_IR 192 and keep
    the decoded name exactly, rather than repeating an invalid value."""
    with pytest.warns(UserWarning, match="ISO-IR 100"):
        src = _source("ISO-IR 100", "Buc^Jérôme", "Thorax")
        assert str(src.PatientName) == "Buc^Jérôme"
    _, sr, sc = _objects(engine, src)
    for obj in (sr, sc):
        assert obj.SpecificCharacterSet == UTF8 and str(obj.PatientName) == "Buc^Jérôme"


def test_result_character_set_rules() -> None:
    ds = Dataset()
    assert result_character_set(ds) is None
    ds.SpecificCharacterSet = ""
    assert result_character_set(ds) is None
    assert result_character_set(ds, ["Dub\ufffdis"]) == UTF8  # decoded with replacement: keep what was read
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    assert result_character_set(ds) == ["", "ISO 2022 IR 87"]
    ds.SpecificCharacterSet = ["ISO 2022 IR 87", ""]  # an empty value is only allowed first (PS3.3 C.12.1.1.2)
    assert result_character_set(ds) == UTF8
    ds.SpecificCharacterSet = "ISO_IR 100"
    assert result_character_set(ds) == "ISO_IR 100"


@pytest.mark.parametrize(
    ("orientation", "expected"),
    [
        (["A", "FR"], ["A", "FR"]),
        (["L", "F"], ["L", "F"]),
        (["LE", "CR"], ["LE", "CR"]),  # quadruped terms (PS3.3 C.7.6.1.1.1.1)
        ("", []),
        (None, []),
        (["LEFT", "FEET"], []),  # not orientation letters: the SC would fail dciodvfy
        (["XX", ""], []),
        (["A"], []),  # one value
    ],
    ids=["compound", "two-letters", "quadruped", "empty", "absent", "words", "garbage", "one-value"],
)
def test_sc_patient_orientation_is_the_source_s(engine: TinyEngine, orientation: Any, expected: list[str]) -> None:
    """PS3.3 C.7.6.1.1.1: the SC shows the source's pixels neither rotated nor flipped, so its Patient
    Orientation is the source's; absent or empty in the source (Type 2 in CR, DX) -> present and empty."""
    src = _source("ISO_IR 100", "Case^Orient", "CR", PatientOrientation=orientation)
    assert ("PatientOrientation" in src) == (orientation is not None)
    _, _, sc = _objects(engine, src)
    assert "PatientOrientation" in sc  # Type 2: present even when empty
    assert list(sc.PatientOrientation or []) == expected
    assert patient_orientation(src) == expected


def test_type_2_patient_attributes_absent_in_source(engine: TinyEngine) -> None:
    """A source without Patient's Name, Sex, Birth Date, Accession Number, Study ID (all Type 2 in the source
    IOD, often left out): SR and SC are built and carry them empty (Type 2)."""
    absent = ("PatientName", "PatientSex", "PatientBirthDate", "AccessionNumber", "StudyID", "ReferringPhysicianName")
    src = _source(None, "X", "Chest", **dict.fromkeys(absent))
    _, sr, sc = _objects(engine, src)
    for obj in (sr, sc):
        for kw in absent:
            assert kw in obj and not obj[kw].value, (obj.Modality, kw)
        assert obj.PatientID == src.PatientID


def test_patient_sex_outside_highdicom_enumeration_is_copied(engine: TinyEngine) -> None:
    """Patient's Sex ``O`` is in PS3.3's enumeration; a lower-case or other value from a modality is copied as
    it is rather than refusing the results (highdicom's constructor refuses it)."""
    src = _source(None, "Doe^Sam", "Chest", PatientSex="U")
    _, sr, sc = _objects(engine, src)
    assert sr.PatientSex == sc.PatientSex == "U"


def test_series_laterality_follows_paired_body_parts() -> None:
    assert series_laterality("CHEST", None) is None
    assert series_laterality("CHEST", "L") is None  # unpaired: General Series Laterality not allowed
    assert series_laterality("BREAST", "L") == "L"
    assert series_laterality("BREAST", None) == ""  # paired, side unknown: Type 2C, empty
    assert series_laterality(None, None) == ""  # body part unknown: may be paired


def test_mammogram_sc_has_series_laterality(engine: TinyEngine) -> None:
    m = tiny_manifest(task="mmg", modalities=("MG",))
    for side, expected in (("L", "L"), ("B", "")):
        src = _roundtrip(make_dataset(synthetic_image(300, 240, (100, 120)), modality="MG", laterality=side, view="CC"))
        a = analyse([src], m, engine.infer, engine.max_batch, 10**8)
        sc = _roundtrip(build_sc(a.result.images[0], src, a.prepared[0].display, a.result, 0))
        assert sc.BodyPartExamined == "BREAST" and sc.Laterality == expected


# --- appliance infer goes on past what fails --------------------------------------------------------


def _folder(tmp_path: Path, n: int) -> tuple[Path, list[Dataset]]:
    src = tmp_path / "in"
    studies = []
    for i in range(n):
        ds = make_dataset(synthetic_image(300, 240, (100 + 10 * i, 120), radius=12))
        save(ds, src / f"s{i}.dcm")
        studies.append(ds)
    (src / "notes.txt").write_text("not dicom")
    (src / "truncated.dcm").write_bytes((src / "s0.dcm").read_bytes()[:300])
    return src, studies


def test_offline_goes_on_past_a_study_that_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, (bad, good) = _folder(tmp_path, 2)
    real = infer_offline.analyse_route

    def analyse_route(r, *args, **kw):  # a fault no input triggers today, injected for one study
        if r.images[0].StudyInstanceUID == bad.StudyInstanceUID:
            raise RuntimeError("decoder crashed")
        return real(r, *args, **kw)

    monkeypatch.setattr(infer_offline, "analyse_route", analyse_route)
    bundles = StaticBundles([(tiny_manifest(), TinyEngine())])
    report = run_offline(Settings(state_dir=tmp_path / "home"), [src], tmp_path / "out", bundles=bundles)
    by_uid = {s["study_uid"]: s for s in report["studies"]}
    assert by_uid[bad.StudyInstanceUID]["state"] == "failed"
    assert by_uid[bad.StudyInstanceUID]["reason"] == "RuntimeError: decoder crashed"
    assert by_uid[good.StudyInstanceUID]["state"] == "inferred"
    assert sorted(o["kind"] for o in by_uid[good.StudyInstanceUID]["results"][0]["objects"]) == ["SC", "SR"]
    errors = {Path(e["path"]).name: e["error"] for e in report["errors"]}
    assert errors["s0.dcm"] == "study failed: RuntimeError: decoder crashed"
    assert errors["notes.txt"].startswith("not readable as DICOM")
    assert "truncated.dcm" in errors  # reported, whichever way its header is short
    assert "s1.dcm" not in errors
    table = format_table(report)
    assert "failed: RuntimeError: decoder crashed" in table and "skipped" in table


@pytest.mark.parametrize("kind", ["SC", "SR"])
def test_offline_result_object_that_cannot_be_built_is_reported_and_the_rest_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    src, (bad, good) = _folder(tmp_path, 2)
    if kind == "SC":
        real_sc = results.build_sc

        def build_sc_failing(img, ds, *args):
            if ds.StudyInstanceUID == bad.StudyInstanceUID:
                raise ValueError("'' is not a valid PatientOrientationValuesBiped")
            return real_sc(img, ds, *args)

        monkeypatch.setattr(results, "build_sc", build_sc_failing)
    else:
        real_sr = infer_offline.build_sr

        def build_sr_failing(result, sources, title):
            if result.study_instance_uid == bad.StudyInstanceUID:
                raise ValueError("'' is not a valid SpecificCharacterSetValues")
            return real_sr(result, sources, title)

        monkeypatch.setattr(infer_offline, "build_sr", build_sr_failing)
    bundles = StaticBundles([(tiny_manifest(), TinyEngine())])
    report = run_offline(Settings(state_dir=tmp_path / "home"), [src], tmp_path / "out", bundles=bundles)
    by_uid = {s["study_uid"]: s for s in report["studies"]}
    res = by_uid[bad.StudyInstanceUID]["results"][0]
    assert by_uid[bad.StudyInstanceUID]["state"] == "inferred" and res["findings"]
    other = "SR" if kind == "SC" else "SC"
    assert [o["kind"] for o in res["objects"]] == [other]
    assert [e["kind"] for e in res["object_errors"]] == [kind]
    assert all(Path(o["path"]).is_file() for o in res["objects"])
    errors = {Path(e["path"]).name: e["error"] for e in report["errors"]}
    assert errors["s0.dcm"].startswith(f"{kind} not built: ValueError")
    assert sorted(o["kind"] for o in by_uid[good.StudyInstanceUID]["results"][0]["objects"]) == ["SC", "SR"]
