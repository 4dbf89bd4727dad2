"""The machine-readable result: one Comprehensive 3D SR (TID 1500 Measurement Report) per study and bundle.

Content, built with highdicom's typed templates:
- observer = the algorithm as a device (uid derived from bundle id + version), algorithm identification
  (bundle id, version) on every measurement group;
- per image and label: a TID 1501 group with the label's score (and whether it passed its threshold);
- per positive finding with a heatmap: a TID 1410 group whose region is the peak as SCOORD POINT and one
  whose region is the iso-line contour as closed SCOORD POLYLINE, both on the source image;
- per study: the study-level abnormality score and, for mammography, the per-breast scores;
- triage: "Priority = Urgent" (SCT 260870009 = SCT 103391001) on each urgent finding's group and the study group
  of an urgent study (see :data:`PRIORITY`).
- procedure reported: the study's own (its procedure codes, else its description, else modality + body
  part; :func:`procedure_reported`), never a fixed title.
SCOORD convention: (column, row) with (0, 0) the top-left corner of the top-left pixel, so a pixel index
(r, c) is drawn at (c + 0.5, r + 0.5).
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes

from appliance import __version__
from appliance.core.compat import attach_sr_content
from appliance.pipeline import uids
from appliance.pipeline.postprocess import ImageResult, StudyResult
from appliance.pipeline.results_source import copy_source_attributes, highdicom_header

MANUFACTURER = "clinic-appliance"
SCHEME = "99CLINICAI"  # private coding scheme for what has no standard code
SR_SERIES_NUMBER = 9901

FINDING_CODES = {
    "nodule": CodedConcept("27925004", "SCT", "Nodule"),
    "effusion": CodedConcept("60046008", "SCT", "Pleural effusion"),
    "pleural_effusion": CodedConcept("60046008", "SCT", "Pleural effusion"),
    "cardiomegaly": CodedConcept("8186001", "SCT", "Cardiomegaly"),
    "lesion": CodedConcept("52988006", "SCT", "Lesion"),
    "mass": CodedConcept("4147007", "SCT", "Mass"),
}
SCORE = CodedConcept("score", SCHEME, "AI score")
STUDY_SCORE = CodedConcept("study-score", SCHEME, "AI study abnormality score")
BREAST_SCORE = {
    "L": CodedConcept("breast-score-L", SCHEME, "AI left breast score"),
    "R": CodedConcept("breast-score-R", SCHEME, "AI right breast score"),
}
ABOVE_THRESHOLD = CodedConcept("above-threshold", SCHEME, "Score at or above operating point")
# Triage flag (a qualitative evaluation, TID 1501/1410 row "Qualitative Evaluation"): concept name SNOMED CT
# 260870009 "Priority" (attribute), value 103391001 "Urgent" (qualifier value; in DICOM CID 3414). Present on the
# group of each finding at or above its bundle's urgent threshold and on the study group of an urgent study;
# absent otherwise (no finding is reported "routine" by a model that has no urgent threshold for it).
PRIORITY = CodedConcept("260870009", "SCT", "Priority")
URGENT = CodedConcept("103391001", "SCT", "Urgent")
YES, NO = codes.SCT.Yes, codes.SCT.No
GENERIC_PROCEDURE = CodedConcept("363679005", "SCT", "Imaging procedure")
# TID 1500 row "Qualitative Evaluations" (DCM 126010), a CONTAINER of the report that CONTAINS TEXT items: one
# Comment (DCM 121106) per image of the study the bundle's input gate refused ("AI not applied to image ...").
QUALITATIVE_EVALUATIONS = CodedConcept("126010", "DCM", "Qualitative Evaluations")
COMMENT = CodedConcept("121106", "DCM", "Comment")


def _codes(items) -> list[CodedConcept]:
    out: list[CodedConcept] = []
    for item in items or []:
        try:
            code = CodedConcept.from_dataset(item)
        except (AttributeError, TypeError, ValueError):  # an incomplete code item: not a procedure we can name
            continue
        if all((c.value, c.scheme_designator) != (code.value, code.scheme_designator) for c in out):
            out.append(code)
    return out


def _text(ds: Dataset, keyword: str) -> str:
    """A text attribute as one line for a Code Meaning (LO, VM 1): values of a multi-valued element joined
    with spaces; control characters and backslashes (the value delimiter) dropped; white space folded."""
    value = ds.get(keyword, "") or ""
    joined = " ".join(str(v) for v in value) if isinstance(value, (MultiValue, list, tuple)) else str(value)
    cleaned = "".join(ch if ch.isprintable() and ch != "\\" else " " for ch in joined)
    return " ".join(cleaned.split())


def procedure_reported(sources: list[Dataset]) -> list[CodedConcept]:
    """TID 1500 "Procedure reported" (121058, DCM; PS3.16 TID 1500 row 4) from the study itself, in order:

    1. the study's Procedure Code Sequence (0008,1032) (PS3.3 C.7.2.1 General Study);
    2. the Requested Procedure Code Sequence (0032,1064), top level or in the Request Attributes Sequence
       (0040,0275) (PS3.3 C.7.3.1, Table 10-9);
    3. else a code of this box's private scheme whose meaning is the study's own words: Study Description
       (0008,1030), else Requested Procedure Description (0032,1060), else modality + Body Part Examined
       ("DX CHEST"); the generic "Imaging procedure" when even those are absent.
    Never a fixed title: a one-view PA chest is not "XR Chest 2V".
    """
    for keyword in ("ProcedureCodeSequence", "RequestedProcedureCodeSequence"):
        found = _codes([item for ds in sources for item in ds.get(keyword) or []])
        if found:
            return found
    requested = _codes(
        [
            item
            for ds in sources
            for request in ds.get("RequestAttributesSequence") or []
            for item in request.get("RequestedProcedureCodeSequence") or []
        ]
    )
    if requested:
        return requested
    words = ""
    for ds in sources:
        words = _text(ds, "StudyDescription") or _text(ds, "RequestedProcedureDescription")
        words = words or next(
            (_text(r, "RequestedProcedureDescription") for r in ds.get("RequestAttributesSequence") or []), ""
        )
        if words:
            break
    if not words:
        modalities = dict.fromkeys(_text(ds, "Modality").upper() for ds in sources)
        parts = dict.fromkeys(_text(ds, "BodyPartExamined").upper() for ds in sources)
        words = " ".join(v for v in [*modalities, *parts] if v)
    if not words:
        return [GENERIC_PROCEDURE]
    meaning = words[:64]
    return [CodedConcept(f"P{uids.derive_uid('procedure', meaning)[-15:]}", SCHEME, meaning)]


def finding_code(label: str) -> CodedConcept:
    return FINDING_CODES.get(label.lower(), CodedConcept(label[:16], SCHEME, label))


def scoord(rows_cols: np.ndarray) -> np.ndarray:
    """(N, 2) pixel indices (row, col) -> SCOORD (column, row) graphic data."""
    rc = np.asarray(rows_cols, dtype=np.float64).reshape(-1, 2)
    return np.stack([rc[:, 1] + 0.5, rc[:, 0] + 0.5], axis=1)


def _image_groups(img: ImageResult, src: Dataset, result: StudyResult, algo: hd.sr.AlgorithmIdentification) -> list:
    groups: list = []
    for f in img.findings:
        track = uids.tracking_uid(
            result.study_instance_uid,
            img.series_instance_uid,
            img.sop_instance_uid,
            f.label,
            result.bundle_id,
            result.bundle_version,
        )
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=track, identifier=f"{f.label} score"),
                finding_type=finding_code(f.label),
                algorithm_id=algo,
                measurements=[hd.sr.Measurement(name=SCORE, value=round(f.score, 6), unit=codes.UCUM.NoUnits)],
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(ABOVE_THRESHOLD, YES if f.positive else NO),
                    *([hd.sr.QualitativeEvaluation(PRIORITY, URGENT)] if f.urgent else []),
                ],
                source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(src)],
            )
        )
        for place, loc in enumerate(f.locations):
            # each place its own peak POINT and outline POLYLINE (TID 1410 groups); the first place keeps the
            # UIDs and identifiers of a one-place finding, the others are numbered from 2
            n = "" if place == 0 else f" {place + 1}"
            regions = [
                ("peak", hd.sr.GraphicTypeValues.POINT, scoord(np.array([[loc.row, loc.col]]))),
                ("outline", hd.sr.GraphicTypeValues.POLYLINE, scoord(np.array(loc.contour + loc.contour[:1]))),
            ]
            for part, gtype, data in regions:
                part_uid = uids.derive_uid(track, part + n)
                groups.append(
                    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                        tracking_identifier=hd.sr.TrackingIdentifier(uid=part_uid, identifier=f"{f.label} {part}{n}"),
                        referenced_region=hd.sr.ImageRegion(
                            graphic_type=gtype,
                            graphic_data=data,
                            source_image=hd.sr.SourceImageForRegion.from_source_image(src),
                        ),
                        finding_type=finding_code(f.label),
                        algorithm_id=algo,
                        measurements=[hd.sr.Measurement(name=SCORE, value=round(f.score, 6), unit=codes.UCUM.NoUnits)],
                    )
                )
    return groups


def build_report(result: StudyResult, sources: list[Dataset], title: str) -> hd.sr.MeasurementReport:
    """The TID 1500 content tree (highdicom's typed templates); ``sources`` in ``result.images`` order."""
    algo = hd.sr.AlgorithmIdentification(name=result.bundle_id, version=result.bundle_version)
    observer = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=uids.observer_uid(result.bundle_id, result.bundle_version),
                name=f"{result.bundle_id} {result.bundle_version}"[:64],
                manufacturer_name=MANUFACTURER,
                model_name=title[:64],
            ),
        )
    )
    groups: list = []
    for img, src in zip(result.images, sources, strict=True):
        groups.extend(_image_groups(img, src, result, algo))
    study_measurements = [
        hd.sr.Measurement(name=STUDY_SCORE, value=round(result.study_score, 6), unit=codes.UCUM.NoUnits)
    ]
    for side, score in sorted((result.per_breast or {}).items()):
        study_measurements.append(
            hd.sr.Measurement(name=BREAST_SCORE[side], value=round(score, 6), unit=codes.UCUM.NoUnits)
        )
    groups.append(
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=uids.derive_uid("study-group", result.study_instance_uid, result.bundle_id, result.bundle_version),
                identifier="study",
            ),
            algorithm_id=algo,
            measurements=study_measurements,
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(PRIORITY, URGENT)] if result.urgent_labels else None,
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(s) for s in sources],
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=observer,
        procedure_reported=procedure_reported(sources),
        imaging_measurements=groups,
    )
    if result.not_applied:
        report[0].ContentSequence.append(not_applied_container(result))
    return report


def not_applied_container(result: StudyResult) -> hd.sr.ContainerContentItem:
    """TID 1500 "Qualitative Evaluations" CONTAINER with one TEXT "Comment" per image the gate refused: "AI not
    applied to image <SOP Instance UID>: <reason>" (the image is not analysed, so it is not evidence)."""
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=COMMENT,
                value=f"AI not applied to image {item['image_sop_uid']}: {item['reason']}",
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
            for item in result.not_applied
        ],
        is_root=False,
    )
    return container


def _referenced_sops(items) -> set[str]:
    """SOP Instance UIDs referenced anywhere in a content tree (IMAGE / COMPOSITE items)."""
    out: set[str] = set()
    stack = list(items)
    while stack:
        item = stack.pop()
        if "ReferencedSOPSequence" in item:
            out.update(str(r.ReferencedSOPInstanceUID) for r in item.ReferencedSOPSequence)
        if "ContentSequence" in item:
            stack.extend(item.ContentSequence)
    return out


def build_sr(
    result: StudyResult, sources: list[Dataset], title: str, full_copy: bool = False
) -> hd.sr.Comprehensive3DSR:
    """One SR for the study; ``sources`` are the analysed images in ``result.images`` order.

    highdicom's SR constructor deep-copies the whole content tree, re-parses the copy into typed items
    and walks the original for image references (its evidence check): ~2/3 of the SR's cost (~80 ms for
    a 4-view study). The tree here is freshly built and owned, so by default the constructor gets a stub
    root (the report's root item with an empty ContentSequence), then the real tree is attached: same dataset (a test
    compares both paths), evidence still from ``sources`` (the Current Requested Procedure Evidence lists
    every evidence instance whether or not the tree references it), reference check done here.
    ``full_copy=True`` takes highdicom's own path.

    Patient and study attributes and the Specific Character Set are the first source's, exactly (PS3.3
    C.7.1.1, C.7.2.1, C.12.1.1.2; :func:`appliance.pipeline.results_source.copy_source_attributes`):
    highdicom is given only the sources' UIDs and equipment
    (:func:`~appliance.pipeline.results_source.highdicom_header`).
    """
    report = build_report(result, sources, title)
    root = report[0]
    if not isinstance(root, hd.sr.ContentItem):  # highdicom's report holds its root CONTAINER item
        raise TypeError(f"unexpected TID 1500 root: {type(root).__name__}")
    content: Dataset = report  # type: ignore[assignment]  # MeasurementReport is a ContentSequence; highdicom takes both
    if not full_copy:
        missing = _referenced_sops(root.ContentSequence) - {str(s.SOPInstanceUID) for s in sources}
        if missing:
            raise ValueError(f"SR references instances not given as evidence: {sorted(missing)}")
        content = Dataset()
        for elem in root:
            if elem.keyword != "ContentSequence":
                content.add(elem)
        content.ContentSequence = []
    source_uids = [img.sop_instance_uid for img in result.images]
    banner = "" if result.clinical_use else " NOT FOR CLINICAL USE"
    sr = hd.sr.Comprehensive3DSR(
        evidence=[highdicom_header(s) for s in sources],
        content=content,
        series_instance_uid=uids.sr_series_uid(result.study_instance_uid, result.bundle_id, result.bundle_version),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uids.sr_instance_uid(
            result.study_instance_uid, source_uids, result.bundle_id, result.bundle_version
        ),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        specific_character_set=None,
    )
    copy_source_attributes(sr, sources[0])
    if not full_copy:
        attach_sr_content(sr, root)  # the original tree, not a copy, as ``sr.ContentSequence`` and ``sr.content``
    sr.SeriesDescription = f"AI findings {result.bundle_id} {result.bundle_version}{banner}"[:64]
    sr.SoftwareVersions = __version__
    return sr


def read_sr_points(sr: Dataset) -> list[dict]:
    """The SCOORD POINTs in an SR (label, referenced SOP, row, col in pixel indices): for tests and tools."""
    out: list[dict] = []

    def walk(items, label: str | None) -> None:
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
            here = label
            if item.ValueType == "CODE" and name == "Finding":
                here = item.ConceptCodeSequence[0].CodeMeaning
            if item.ValueType == "SCOORD" and item.GraphicType == "POINT":
                ref = item.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                x, y = (float(v) for v in item.GraphicData)
                out.append({"finding": label, "sop_uid": ref, "row": y - 0.5, "col": x - 0.5})
            if "ContentSequence" in item:
                walk(item.ContentSequence, here)

    def walk_groups(items) -> None:
        for item in items:
            if "ContentSequence" not in item:
                continue
            finding = None
            for child in item.ContentSequence:
                cname = child.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in child else ""
                if child.ValueType == "CODE" and cname == "Finding":
                    finding = child.ConceptCodeSequence[0].CodeMeaning
            if finding is not None:
                walk(item.ContentSequence, finding)
            else:
                walk_groups(item.ContentSequence)

    walk_groups(sr.ContentSequence)
    return out
