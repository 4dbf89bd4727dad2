"""Which active bundles apply to a completed study, and which of its images each one takes: the intended-use gate.

A bundle applies to an image when the image matches the manifest's ``applies_to`` (modality, SOP class, the
``input_contract``: presentation intent, image type, conversion type, burned-in annotation, photometric, bits,
size, patient age; anatomy, view and its modifiers, laterality; empty lists mean any) and the local config's
route rules allow it. :func:`refusal_detail` gives the first failed check per image as a :class:`Refusal`
(a category of :data:`REFUSAL_CATEGORIES` and a reason in the standard's terms). Anatomy, view and laterality
are read as the standard requires them, coded attributes first (``appliance.pipeline.anatomy``: View Code
Sequence, Anatomic Region Sequence, Image / frame / series laterality), View Position and Body Part Examined as
the fall-backs.

The gate is per image: a bundle analyses only the images it takes (:func:`route`); the images of its modality it
refused are named with their reasons in its results. A study no bundle's modality matches is recorded as
``no_model`` by the worker, with the reason per image (:func:`explain`); a study that a bundle's modality matches
but whose every image the gate refused (:func:`gated`) is ``not_analysed``, with one reason per image
(:func:`not_applied_detail`): both facts about the study, not errors.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, get_args

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.coding import Code
from pydicom.uid import UID

from appliance.core.config import RouteRule
from appliance.pipeline.anatomy import (
    BODY_PART_TERMS,
    VIEW_TERMS,
    code_text,
    defined_term,
    laterality_of,
    region_of,
    term_of,
    view_of,
)
from engines.manifest import CodeRef, InputContract, Manifest

EXPLAIN_SAMPLES = 3  # image identifiers listed per distinct reason in a no_model detail


def _norm(values: list[str]) -> set[str]:
    return {v.strip().upper() for v in values}


def _tag(ds: Dataset, name: str) -> str:
    return defined_term(ds.get(name, ""))


def _code(ref: CodeRef) -> Code:
    return Code(ref.value, ref.scheme_designator.upper(), ref.meaning)


def _accepts(
    terms: list[str], refs: list[CodeRef], table: dict[str, tuple[Code, ...]], code: Code | None, term: str | None
) -> bool:
    """Whether a concept read from an image (its code and/or defined term) is one the manifest states, each
    stated term standing also for its codes in ``table`` and each stated code for its term."""
    wanted_terms = _norm(terms)
    wanted_codes = [_code(r) for r in refs]
    for t in wanted_terms:
        wanted_codes.extend(table.get(t, ()))
    wanted_terms |= {t for t in (term_of(c, table) for c in wanted_codes) if t}
    if code is not None and any(code == w for w in wanted_codes):
        return True
    return term is not None and term in wanted_terms


def _stated(terms: list[str], refs: list[CodeRef]) -> str:
    return ", ".join([*terms, *(code_text(_code(r)) for r in refs)])


def modality_applies(manifest: Manifest, modality: str | None) -> bool:
    """The first check of :func:`image_matches`, from the modality alone (the receiver's header)."""
    return (modality or "").strip().upper() in _norm(manifest.applies_to.modalities)


RefusalCategory = Literal[
    "modality",
    "sop_class",
    "presentation_intent",
    "image_type",
    "conversion_type",
    "burned_in_annotation",
    "photometric",
    "bits",
    "size",
    "anatomy",
    "view",
    "view_modifier",
    "laterality",
    "age",
]
# The machine-readable refusal categories, in the order they are checked: a bounded label set (metrics, stats).
REFUSAL_CATEGORIES: tuple[RefusalCategory, ...] = get_args(RefusalCategory)


@dataclass(frozen=True)
class Refusal:
    """Why a bundle does not take an image: ``category`` (one of :data:`REFUSAL_CATEGORIES`, for counting) and
    ``reason`` (a sentence for people in the standard's terms; no patient name or UID, but it may state the
    patient's age, so it stays on the box: the cloud gets the category only)."""

    category: RefusalCategory
    reason: str


# Conversion Type (0008,0064) defined terms, PS3.3 C.8.6.1
CONVERSION_TYPES = {
    "DV": "digitized video",
    "DI": "digital interface",
    "DF": "digitized film",
    "WSD": "workstation screen capture",
    "SD": "scanned document",
    "SI": "scanned image",
    "DRW": "drawing",
    "SYN": "synthetic image",
}
_AGE_STRING = re.compile(r"^([0-9]{3})([DWMY])\Z")  # Age String, PS3.5 6.2 AS
_DAYS_PER_YEAR = 365.2425


def _sop_class_name(uid: str) -> str:
    name = UID(uid).name if uid else ""
    return name if name and name != uid else (uid or "absent")


def _values(ds: Dataset, keyword: str) -> list[str]:
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    items = value if isinstance(value, MultiValue | list | tuple) else [value]
    return [str(v).strip().upper() for v in items]


def _int_value(ds: Dataset, keyword: str) -> int | None:
    """A single-valued integer attribute (US, IS) as an int; None when absent or zero length. Raises ValueError
    naming the attribute, never its value, when it is not one integer: several values, text that is not a
    number (a wrong VR), a fraction, or bytes pydicom cannot read as the VR (a wrong length)."""
    try:
        value = ds.get(keyword)
    except Exception as exc:  # pydicom's BytesLengthException (not a ValueError) for a US of the wrong length
        raise ValueError(f"{keyword} unreadable ({type(exc).__name__})") from None
    if value is None or value == "":
        return None
    if isinstance(value, MultiValue | list | tuple):
        raise ValueError(f"{keyword} has {len(value)} values, 1 expected")
    try:
        number = float(value) if isinstance(value, float) else int(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{keyword} is not an integer") from None
    if isinstance(number, float):
        if not number.is_integer():
            raise ValueError(f"{keyword} is not an integer")
        number = int(number)
    return number


def _da(value: object) -> dt.date | None:
    text = str(value or "").strip()
    if not re.fullmatch(r"[0-9]{8}", text):
        return None
    try:
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


@dataclass(frozen=True)
class PatientAge:
    """The patient's age at the study: completed ``years``, as ``shown`` (``12Y``, ``18M``), and the attributes it
    was read from (``source``, the standard's names)."""

    years: int
    shown: str
    source: str


def patient_age(ds: Dataset) -> PatientAge | None:
    """Patient's Age (0010,1010) (PS3.5 AS ``nnnD|W|M|Y``; days, weeks and months become completed years), else
    completed years from Patient's Birth Date (0010,0030) to Study Date (0008,0020) (DA ``YYYYMMDD``); None when
    neither gives a valid age (absent, malformed, birth after the study)."""
    m = _AGE_STRING.match(str(ds.get("PatientAge", "") or "").strip().upper())
    if m:
        n, unit = int(m.group(1)), m.group(2)
        days = {"D": n, "W": 7 * n}.get(unit)
        years = n if unit == "Y" else n // 12 if unit == "M" else int((days or 0) // _DAYS_PER_YEAR)
        return PatientAge(years, f"{n}{unit}", "Patient's Age")
    birth, study = _da(ds.get("PatientBirthDate")), _da(ds.get("StudyDate"))
    if birth is None or study is None or birth > study:
        return None
    years = study.year - birth.year - ((study.month, study.day) < (birth.month, birth.day))
    return PatientAge(years, f"{years}Y", "Patient's Birth Date and Study Date")


def _contract_refusal(c: InputContract, ds: Dataset) -> Refusal | None:
    """The image-kind and encoding checks of an input contract (the anatomy/view checks and the age come after)."""
    intent = str(ds.get("PresentationIntentType", "") or "").strip().upper()
    if c.presentation_intents and intent and intent not in c.presentation_intents:
        takes = " or ".join(i.title() for i in c.presentation_intents)
        return Refusal("presentation_intent", f"{intent.title()} image (Presentation Intent Type), model takes {takes}")
    image_type = _values(ds, "ImageType")
    for pattern in c.refused_image_types:
        if image_type and set(pattern.split("\\")) <= set(image_type):
            shown = "\\".join(image_type)
            return Refusal("image_type", f"Image Type {shown} refused: model takes no {pattern} image")
    conversion = str(ds.get("ConversionType", "") or "").strip().upper()
    if conversion and conversion in c.refused_conversion_types:
        what = CONVERSION_TYPES.get(conversion, "converted image")
        return Refusal("conversion_type", f"Conversion Type {conversion} ({what}): model takes modality images only")
    if c.refuse_burned_in_annotation and str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES":
        return Refusal(
            "burned_in_annotation", "Burned In Annotation YES (text in the pixels): model takes images without it"
        )
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if c.photometric_interpretations and photometric not in c.photometric_interpretations:
        takes = ", ".join(c.photometric_interpretations)
        return Refusal(
            "photometric", f"Photometric Interpretation {photometric or 'absent'} not taken: model takes {takes}"
        )
    if c.bits_stored:
        takes = ", ".join(str(b) for b in c.bits_stored)
        try:
            bits = _int_value(ds, "BitsStored")
        except ValueError as exc:
            return Refusal("bits", f"Bits Stored not readable: {exc} (PS3.5 US, VM 1): model takes {takes}")
        if bits is None or bits not in c.bits_stored:
            shown = str(bits) if bits is not None else "absent"
            return Refusal("bits", f"Bits Stored {shown} not taken: model takes {takes}")
    for keyword, lo, hi in (("Rows", c.min_rows, c.max_rows), ("Columns", c.min_columns, c.max_columns)):
        if lo is None and hi is None:
            continue
        try:
            value = _int_value(ds, keyword)
        except ValueError as exc:
            return Refusal("size", f"{keyword} not readable: {exc} (PS3.5 US, VM 1)")
        if value is None:
            return Refusal("size", f"{keyword} absent")
        if lo is not None and value < lo:
            return Refusal("size", f"{keyword} {value} below the model's minimum {lo}")
        if hi is not None and value > hi:
            return Refusal("size", f"{keyword} {value} above the model's maximum {hi}")
    return None


def _age_refusal(c: InputContract, ds: Dataset) -> Refusal | None:
    if c.min_age_years is None and c.max_age_years is None:
        return None
    age = patient_age(ds)
    if age is None:
        if c.unknown_age == "refuse":
            return Refusal(
                "age",
                "patient age unknown (no valid Patient's Age, nor Patient's Birth Date and Study Date):"
                " model refuses an unknown age",
            )
        return None
    if c.min_age_years is not None and age.years < c.min_age_years:
        return Refusal("age", f"patient age {age.shown} below the model's minimum {c.min_age_years}Y ({age.source})")
    if c.max_age_years is not None and age.years > c.max_age_years:
        return Refusal("age", f"patient age {age.shown} above the model's maximum {c.max_age_years}Y ({age.source})")
    return None


def refusal_detail(manifest: Manifest, ds: Dataset) -> Refusal | None:
    """Why the bundle does not take this image (category and reason), or None when it does.

    Checked in the order of :data:`REFUSAL_CATEGORIES`: Modality (0008,0060); SOP Class UID (``sop_classes``);
    then the ``input_contract`` (when the manifest declares one): Presentation Intent Type (0008,0068), Image Type
    (0008,0008), Conversion Type (0008,0064), Burned In Annotation (0028,0301), Photometric Interpretation
    (0028,0004), Bits Stored (0028,0101), Rows / Columns; then anatomy (Anatomic Region Sequence (0008,2218), else
    Body Part Examined (0018,0015), PS3.3 C.8.11.2 / C.7.3.1) against ``body_parts`` / ``anatomy_codes``; view
    (View Code Sequence (0054,0220), else View Position (0018,5101), PS3.3 C.8.11.7 / C.8.11.5) against ``views`` /
    ``view_codes``; View Modifier Code Sequence (0054,0222) against ``view_modifiers``; laterality (Image
    Laterality, Frame Laterality, Laterality) against ``lateralities``; last the patient's age (:func:`patient_age`)
    against the contract's range. SCT and SRT codes of one SNOMED concept are the same concept. The first failed
    check is the answer."""
    a = manifest.applies_to
    modality = _tag(ds, "Modality")
    if not modality_applies(manifest, modality):
        return Refusal("modality", f"modality {modality or 'absent'} not in {', '.join(a.modalities)}")
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if a.sop_classes and sop_class not in set(a.sop_classes):
        takes = ", ".join(_sop_class_name(u) for u in a.sop_classes)
        return Refusal("sop_class", f"{_sop_class_name(sop_class)} (SOP Class UID) not taken: model takes {takes}")
    if a.input_contract is not None:
        refused = _contract_refusal(a.input_contract, ds)
        if refused is not None:
            return refused
    if a.body_parts or a.anatomy_codes:
        region = region_of(ds)
        if not _accepts(a.body_parts, a.anatomy_codes, BODY_PART_TERMS, region.code, region.term):
            return Refusal("anatomy", f"anatomy {region.describe()} not in {_stated(a.body_parts, a.anatomy_codes)}")
    if a.views or a.view_codes or a.view_modifiers is not None:
        view = view_of(ds)
        if (a.views or a.view_codes) and not _accepts(a.views, a.view_codes, VIEW_TERMS, view.code, view.term):
            return Refusal("view", f"view {view.describe()} not in {_stated(a.views, a.view_codes)}")
        if a.view_modifiers is not None:
            allowed = [_code(r) for r in a.view_modifiers]
            extra = [m for m in view.modifiers if not any(m == w for w in allowed)]
            if extra:
                return Refusal("view_modifier", f"view modifier {', '.join(code_text(m) for m in extra)} not taken")
    if a.lateralities:
        side = laterality_of(ds)
        if side not in a.lateralities:
            return Refusal("laterality", f"laterality {side or 'unknown'} not in {', '.join(a.lateralities)}")
    if a.input_contract is not None:
        return _age_refusal(a.input_contract, ds)
    return None


def refusal(manifest: Manifest, ds: Dataset) -> str | None:
    """Why the bundle does not take this image, in words, or None when it does (:func:`refusal_detail`)."""
    found = refusal_detail(manifest, ds)
    return None if found is None else found.reason


def image_matches(manifest: Manifest, ds: Dataset) -> bool:
    """Whether the bundle takes this image (:func:`refusal` gives the reason when it does not)."""
    return refusal(manifest, ds) is None


def _rule_matches(rule: RouteRule, images: list[Dataset], calling_ae: str | None) -> bool:
    if rule.calling_aes and (calling_ae or "").strip().upper() not in _norm(rule.calling_aes):
        return False
    if rule.modalities and not any(_tag(d, "Modality") in _norm(rule.modalities) for d in images):
        return False
    return not (rule.body_parts and not any(region_of(d).term in _norm(rule.body_parts) for d in images))


def allowed_by_rules(bundle_id: str, rules: list[RouteRule], images: list[Dataset], calling_ae: str | None) -> bool:
    mine = [r for r in rules if r.bundle_id == bundle_id]
    if any(r.action == "exclude" and _rule_matches(r, images, calling_ae) for r in mine):
        return False
    includes = [r for r in mine if r.action == "include"]
    return not includes or any(_rule_matches(r, images, calling_ae) for r in includes)


class InferenceEngine(Protocol):
    """What the pipeline needs of a loaded model (``engines.backends.base.Engine`` is one): ``infer`` maps
    input name -> array (N, ...) to output name -> array (N, ...); ``max_batch`` is the largest N it takes."""

    @property
    def max_batch(self) -> int: ...

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass
class Route:
    """One bundle on one study: the ``images`` it takes (arrival order) and the ones of its modality it refused,
    each with its :class:`Refusal` (named in the results, never analysed). A route of :func:`gated` takes none."""

    manifest: Manifest
    engine: InferenceEngine
    images: list[Dataset]
    refused: list[tuple[Dataset, Refusal]] = field(default_factory=list)


def route(
    bundles: Sequence[tuple[Manifest, InferenceEngine]],
    images: list[Dataset],
    rules: list[RouteRule],
    calling_ae: str | None = None,
) -> list[Route]:
    """One Route per applicable bundle, with the study's images that bundle takes (arrival order kept) and the
    images of its modality that it refused (:func:`refusal_detail`): those are never analysed, only named."""
    out = []
    for manifest, engine in bundles:
        decided = [(ds, refusal_detail(manifest, ds)) for ds in images]
        mine = [ds for ds, why in decided if why is None]
        refused = [(ds, why) for ds, why in decided if why is not None and why.category != "modality"]
        if mine and allowed_by_rules(manifest.bundle_id, rules, mine, calling_ae):
            out.append(Route(manifest, engine, mine, refused))
    return out


def gated(
    bundles: Sequence[tuple[Manifest, InferenceEngine]],
    images: list[Dataset],
    rules: list[RouteRule],
    calling_ae: str | None = None,
) -> list[Route]:
    """The bundles that would have taken the study but whose gate refused every image: the bundle's modality
    matches at least one image, the local route rules allow it for those images, and :func:`refusal_detail`
    refuses each of them. One Route per such bundle with ``images`` empty and ``refused`` the images of its
    modality. A study with such bundles and no :func:`route` is ``not_analysed``; with none, ``no_model``."""
    out = []
    for manifest, engine in bundles:
        candidates = [ds for ds in images if modality_applies(manifest, _tag(ds, "Modality"))]
        if not candidates or not allowed_by_rules(manifest.bundle_id, rules, candidates, calling_ae):
            continue
        decided = [(ds, refusal_detail(manifest, ds)) for ds in candidates]
        refused = [(ds, why) for ds, why in decided if why is not None]
        if len(refused) == len(candidates):
            out.append(Route(manifest, engine, [], refused))
    return out


def refused_summary(refused: list[tuple[Dataset, Refusal]]) -> list[dict[str, str]]:
    """The refused images of a route as stored in a result summary: ``[{image_sop_uid, image_series_uid,
    category, reason}]`` in arrival order."""
    return [
        {
            "image_sop_uid": str(ds.get("SOPInstanceUID", "") or ""),
            "image_series_uid": str(ds.get("SeriesInstanceUID", "") or ""),
            "category": why.category,
            "reason": why.reason,
        }
        for ds, why in refused
    ]


def not_applied_detail(routes: list[Route]) -> str:
    """Per bundle, the refused images grouped by reason (count and up to ``EXPLAIN_SAMPLES`` SOP Instance UID
    tails): ``"mmg-phantom: 2 images …a, …b: For Processing image (Presentation Intent Type), model takes For
    Presentation"``, bundles joined by `` | ``; empty when nothing was refused."""
    parts = []
    for r in routes:
        groups: dict[str, list[str]] = {}
        for ds, why in r.refused:
            groups.setdefault(why.reason, []).append(_image_id(ds))
        for reason, ids in groups.items():
            shown = _samples(ids)
            noun = "image" if len(ids) == 1 else f"{len(ids)} images"
            parts.append(f"{r.manifest.bundle_id}: {noun} {shown}: {reason}")
    return " | ".join(parts)


def describe(images: list[Dataset]) -> str:
    """What the study holds (modality / anatomy term per kind of image)."""
    kinds = sorted({f"{_tag(d, 'Modality') or '?'}/{region_of(d).term or '?'}" for d in images})
    return ", ".join(kinds) or "no images"


def _samples(ids: list[str]) -> str:
    """Up to ``EXPLAIN_SAMPLES`` image ids, then how many more: ``"…a, …b, …c and 2 more"``."""
    more = len(ids) - EXPLAIN_SAMPLES
    return ", ".join(ids[:EXPLAIN_SAMPLES]) + (f" and {more} more" if more > 0 else "")


def _image_id(ds: Dataset) -> str:
    uid = str(ds.get("SOPInstanceUID", "") or "")
    return "…" + uid[-12:] if uid else "?"


def explain(
    bundles: Sequence[tuple[Manifest, object]],
    images: list[Dataset],
    rules: list[RouteRule],
    calling_ae: str | None = None,
) -> str:
    """The ``no_model`` detail: per image, why each active bundle does not take it (:func:`refusal`), or that
    the local route rules exclude it. Images with the same reasons are grouped (count and up to
    ``EXPLAIN_SAMPLES`` SOP Instance UID tails), so a 500-slice series stays one line."""
    if not images:
        return "no images"
    if not bundles:
        return f"no active model ({describe(images)})"
    refusals = [[refusal(m, ds) for ds in images] for m, _ in bundles]
    taken = [[ds for ds, r in zip(images, why, strict=True) if r is None] for why in refusals]
    excluded = [
        not allowed_by_rules(m.bundle_id, rules, mine, calling_ae) for (m, _), mine in zip(bundles, taken, strict=True)
    ]
    groups: dict[str, list[str]] = {}
    for i, ds in enumerate(images):
        reasons = "; ".join(
            f"{m.bundle_id}: {refusals[b][i] or ('excluded by the local route rules' if excluded[b] else 'taken')}"
            for b, (m, _) in enumerate(bundles)
        )
        groups.setdefault(reasons, []).append(_image_id(ds))
    parts = []
    for reasons, ids in groups.items():
        shown = _samples(ids)
        noun = "image" if len(ids) == 1 else f"{len(ids)} images"
        parts.append(f"{noun} {shown}: {reasons}")
    return "no active model applies: " + " | ".join(parts)
