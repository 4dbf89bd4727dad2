"""The intended use of the reference models, as manifest ``applies_to`` values: the defaults a bundle builder
starts from (``training/train.py`` builds the reference manifests with them).

SOP Class UIDs are PS3.4 Annex B / PS3.6 Annex A (checked against pydicom's UID registry in the tests). Only
For Presentation images are taken: the reference models were trained on images as a viewer shows them, never
on raw For Processing data. View modifiers (PS3.16 CID 4015: spot compression, magnification, implant displaced,
...) are an explicit policy: none is taken, so a spot-compressed or magnified mammogram view is refused, not
scored as a whole breast.
"""

from __future__ import annotations

from typing import Any

from engines.manifest import InputContract

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"  # Digital Mammography X-Ray Image Storage - For Presentation
BREAST_PROJECTION_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.13.1.4"  # Breast Projection X-Ray Image Storage - FPr

# Conversion Type (0008,0064) defined terms (PS3.3 C.8.6.1): every way an image is made other than by the modality.
ALL_CONVERSION_TYPES = ["DV", "DI", "DF", "WSD", "SD", "SI", "DRW", "SYN"]


def default_contract_for(task: str) -> InputContract:
    """The input contract recommended for a reference model of ``task`` ("cxr" or "mmg"): For Presentation only,
    no DERIVED\\SECONDARY image, no screen capture or other converted image, no burned-in annotation, adults only
    (cxr >= 18 completed years, mmg >= 30; an unknown age is accepted: many sites strip it, and the other checks
    still hold), monochrome 10..16-bit images of 200..8192 pixels a side. Raises ValueError for another task."""
    common: dict[str, Any] = {
        "presentation_intents": ["FOR PRESENTATION"],
        "refused_image_types": ["DERIVED\\SECONDARY"],
        "refused_conversion_types": ALL_CONVERSION_TYPES,
        "refuse_burned_in_annotation": True,
        "unknown_age": "accept",
        "min_rows": 200,
        "max_rows": 8192,
        "min_columns": 200,
        "max_columns": 8192,
        "bits_stored": list(range(10, 17)),
        "photometric_interpretations": ["MONOCHROME1", "MONOCHROME2"],
    }
    if task == "cxr":
        return InputContract(min_age_years=18, **common)
    if task == "mmg":
        return InputContract(min_age_years=30, **common)
    raise ValueError(f"no default input contract for task {task!r}")


def reference_applies_to(task: str) -> dict[str, Any]:
    """The full ``applies_to`` of a reference bundle of ``task`` (JSON form, as a manifest holds it)."""
    contract = default_contract_for(task).model_dump(mode="json")
    if task == "cxr":
        return {
            "modalities": ["DX", "CR"],
            "body_parts": ["CHEST"],
            "views": ["PA", "AP"],
            "sop_classes": [CR_IMAGE_STORAGE, DX_FOR_PRESENTATION],
            "input_contract": contract,
        }
    return {
        "modalities": ["MG"],
        "body_parts": ["BREAST"],
        "views": ["CC", "MLO"],
        "sop_classes": [MG_FOR_PRESENTATION, BREAST_PROJECTION_FOR_PRESENTATION],
        "view_modifiers": [],
        "lateralities": ["L", "R"],
        "input_contract": contract,
    }
