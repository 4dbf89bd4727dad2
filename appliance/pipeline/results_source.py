"""What the result objects (SR and SC) take from their source image, copied exactly.

A PACS files a result under the patient and study it names, so the Patient, General Study, Patient Study
and Clinical Trial modules (PS3.3 C.7.1.1, C.7.2.1, C.7.2.2, C.7.1.3, C.7.2.3) are copied element for element
from the source, with its Specific Character Set (PS3.3 C.12.1.1.2) in any form PS3.5 6.1 allows: single
valued, multi-valued with ISO 2022 code extensions and escape sequences (``\\ISO 2022 IR 87``,
``ISO 2022 IR 149``, ``ISO 2022 IR 13\\ISO 2022 IR 87`` ...), or ``ISO_IR 192``. Person names keep their
alphabetic, ideographic and phonetic groups (PS3.5 6.2.1).

highdicom's constructors validate what they are given against enumerations that are narrower than the
standard (an empty first value of Specific Character Set, ``ISO 2022 IR 149``, a zero-length Patient
Orientation, a Patient's Sex outside M/F/O all raise), so they are given :func:`highdicom_header`, the
source's identifying UIDs and equipment without patient data, and :func:`copy_source_attributes` copies
the modules afterwards through highdicom's own module tables.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import highdicom as hd
from pydicom.charset import python_encoding
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

UTF8 = "ISO_IR 192"
# what highdicom's constructors read from a reference image besides the patient and study: the UIDs of the
# evidence and the acquisition equipment (recorded as Contributing Equipment, PS3.3 C.12.1.1.2 / 10.X)
_HEADER = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "SoftwareVersions",
    "DeviceSerialNumber",
    "InstitutionName",
    "InstitutionalDepartmentName",
    "InstitutionAddress",
    "StationName",
    "AcquisitionDateTime",
    "AcquisitionDate",
    "AcquisitionTime",
)
# Type 2 attributes highdicom's SR constructor reads from its first evidence: empty in the header
_EMPTY_TYPE_2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
# the Patient and General Study identification, for a source whose SOP Class highdicom has no module table of
_IDENTIFICATION = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
)


# Body Part Examined defined terms of unpaired structures (PS3.16 Annex L, "Laterality" column; the list
# dciodvfy checks General Series Laterality against, each asserted in tests/test_result_objects_dicom.py)
UNPAIRED_BODY_PARTS = frozenset(
    {
        "ABDOMEN",
        "ABDOMENPELVIS",
        "AORTA",
        "BLADDER",
        "BRAIN",
        "CERVIX",
        "CHEST",
        "CHESTABDOMEN",
        "CHESTABDPELVIS",
        "COCCYX",
        "COLON",
        "CSPINE",
        "CTSPINE",
        "DUODENUM",
        "ESOPHAGUS",
        "FACE",
        "GALLBLADDER",
        "HEAD",
        "HEADNECK",
        "HEART",
        "JAW",
        "LARYNX",
        "LIVER",
        "LSPINE",
        "LSSPINE",
        "MEDIASTINUM",
        "MOUTH",
        "NECK",
        "NOSE",
        "PANCREAS",
        "PELVIS",
        "PENIS",
        "PHARYNX",
        "PROSTATE",
        "RECTUM",
        "SKULL",
        "SPINE",
        "SPLEEN",
        "SSPINE",
        "STERNUM",
        "STOMACH",
        "THYROID",
        "TLSPINE",
        "TONGUE",
        "TRACHEA",
        "TSPINE",
        "URETHRA",
        "UTERUS",
        "VAGINA",
        "WHOLEBODY",
    }
)


def series_laterality(body_part: str | None, laterality: str | None) -> str | None:
    """General Series Laterality (0020,0060) of a derived image (PS3.3 C.7.3.1, Type 2C: required if the body
    part examined is a paired structure): ``None`` (absent) for an unpaired Body Part Examined, else the
    image's side ``R``/``L``, or zero length where the side is not known."""
    if (body_part or "").strip().upper() in UNPAIRED_BODY_PARTS:
        return None
    return laterality if laterality in ("L", "R") else ""


def highdicom_header(src: Dataset) -> Dataset:
    """The source's UIDs and acquisition equipment, the Type 2 patient and study attributes empty: what
    highdicom's SR and SC constructors may read and validate (``SCImage.from_ref_dataset``,
    ``Comprehensive3DSR(evidence=...)``). Values are
    the source's decoded values (PS3.5 6.1: decoded with the source's Specific Character Set)."""
    out = Dataset()
    for keyword in _EMPTY_TYPE_2:  # highdicom's SR reads these as attributes; copied afterwards
        setattr(out, keyword, None)
    for keyword in _HEADER:
        if keyword in src:
            out[keyword] = src[keyword]
    return out


def _terms(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value] if isinstance(value, (list, tuple, MultiValue)) else [str(value)]


def result_character_set(src: Dataset, texts: Iterable[str] = ()) -> str | list[str] | None:
    """Specific Character Set (0008,0005) for a result object made from ``src`` (PS3.3 C.12.1.1.2).

    The source's value exactly (single, multi-valued, ISO 2022 with an empty first value) when every term is
    a defined term of PS3.3 Table C.12-2/C.12-3/C.12-4 that pydicom encodes; ``None`` (default repertoire)
    when the source has none. A source whose value is not a defined term (pydicom decoded it with a
    corrected or fall-back encoding), or whose ``texts`` were decoded with replacement characters, gets
    ``ISO_IR 192``: UTF-8 encodes whatever was decoded, so nothing is lost a second time.
    """
    terms = _terms(src.get("SpecificCharacterSet"))
    if not any(t.strip() for t in terms):
        return UTF8 if any("\ufffd" in t for t in texts) else None
    defined = all(t in python_encoding and (t != "" or i == 0) for i, t in enumerate(terms))
    if not defined or any("\ufffd" in t for t in texts):
        return UTF8
    return terms[0] if len(terms) == 1 else list(terms)


def _text_values(ds: Dataset) -> list[str]:
    """Every string value at the root of ``ds`` (person names by their groups), to look for U+FFFD."""
    out: list[str] = []
    for elem in ds:
        if elem.VR == "SQ" or elem.value is None:
            continue
        for v in elem.value if isinstance(elem.value, (list, MultiValue)) else [elem.value]:
            if isinstance(v, PersonName):
                out.extend(g for g in (v.alphabetic, v.ideographic, v.phonetic) if g)
            elif isinstance(v, str):
                out.append(v)
    return out


def copy_source_attributes(dst: hd.SOPClass, src: Dataset) -> None:
    """Copy the Patient, General Study, Patient Study and Clinical Trial Subject/Study modules (PS3.3
    C.7.1.1, C.7.2.1, C.7.2.2, C.7.1.3, C.7.2.3) from ``src`` into ``dst`` element for element (highdicom's
    ``copy_patient_and_study_information``), then set ``dst``'s Specific Character Set
    (:func:`result_character_set`). Attributes the source lacks stay as highdicom made them (Type 2: empty).
    """
    try:
        dst.copy_patient_and_study_information(src)
    except (KeyError, AttributeError):  # a SOP Class highdicom has no module table for: the identification
        for keyword in _IDENTIFICATION:
            if keyword in src:
                dst[keyword] = src[keyword]
    charset = result_character_set(src, _text_values(dst))
    if charset is None:
        if "SpecificCharacterSet" in dst:
            del dst.SpecificCharacterSet
    else:
        dst.SpecificCharacterSet = charset


# PS3.3 C.7.6.1.1.1: each value is letters of A P R L H F (biped), or of the quadruped terms (C.7.6.1.1.1.1)
_ORIENTATION = re.compile(r"[APRLHF]{1,3}|(?:LE|RT|CR|CD|PR|DI|PA|PL|D|V|R|M|L){1,4}")


def patient_orientation(src: Dataset) -> list[str]:
    """Patient Orientation (0020,0020) of an image that shows ``src``'s pixels resampled, neither rotated nor
    flipped: the source's two values exactly (PS3.3 C.7.6.1.1.1, e.g. ``A\\FR``); zero length where the source
    has none, not two values, or values that are not orientation letters (``[]``; Type 2 in the General
    Image module of the SC IOD, PS3.3 A.8.1)."""
    values = [v.strip().upper() for v in _terms(src.get("PatientOrientation"))]
    valid = len(values) == 2 and all(_ORIENTATION.fullmatch(v) for v in values)
    return values if valid else []
