"""Which active bundles apply to a completed study, and which of its images each one takes.

A bundle applies to an image when the image matches the manifest's ``applies_to`` (modality, anatomy, view and
its modifiers, laterality, SOP class; empty lists mean any) and the local config's route rules allow it. Anatomy,
view and laterality are read as the standard requires them, coded attributes first (``appliance.pipeline.anatomy``:
View Code Sequence, Anatomic Region Sequence, Image / frame / series laterality), View Position and Body Part
Examined as the fall-backs. A study no bundle applies to is recorded as ``no_model`` by the worker, with the
reason per image (:func:`explain`): that is a fact about the study, not an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

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
from engines.manifest import CodeRef, Manifest

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


def refusal(manifest: Manifest, ds: Dataset) -> str | None:
    """Why the bundle does not take this image, or None when it does.

    Checked in order: Modality (0008,0060); SOP Class UID; anatomy (Anatomic Region Sequence (0008,2218), else
    Body Part Examined (0018,0015), PS3.3 C.8.11.2 / C.7.3.1) against ``body_parts`` / ``anatomy_codes``; view
    (View Code Sequence (0054,0220), else View Position (0018,5101), PS3.3 C.8.11.7 / C.8.11.5) against
    ``views`` / ``view_codes``; View Modifier Code Sequence (0054,0222) against ``view_modifiers``; laterality
    (Image Laterality, Frame Laterality, Laterality) against ``lateralities``. SCT and SRT codes of one SNOMED
    concept are the same concept."""
    a = manifest.applies_to
    modality = _tag(ds, "Modality")
    if not modality_applies(manifest, modality):
        return f"modality {modality or 'absent'} not in {', '.join(a.modalities)}"
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if a.sop_classes and sop_class not in set(a.sop_classes):
        return f"SOP class {sop_class or 'absent'} not taken"
    if a.body_parts or a.anatomy_codes:
        region = region_of(ds)
        if not _accepts(a.body_parts, a.anatomy_codes, BODY_PART_TERMS, region.code, region.term):
            return f"anatomy {region.describe()} not in {_stated(a.body_parts, a.anatomy_codes)}"
    if a.views or a.view_codes or a.view_modifiers is not None:
        view = view_of(ds)
        if (a.views or a.view_codes) and not _accepts(a.views, a.view_codes, VIEW_TERMS, view.code, view.term):
            return f"view {view.describe()} not in {_stated(a.views, a.view_codes)}"
        if a.view_modifiers is not None:
            allowed = [_code(r) for r in a.view_modifiers]
            extra = [m for m in view.modifiers if not any(m == w for w in allowed)]
            if extra:
                return f"view modifier {', '.join(code_text(m) for m in extra)} not taken"
    if a.lateralities:
        side = laterality_of(ds)
        if side not in a.lateralities:
            return f"laterality {side or 'unknown'} not in {', '.join(a.lateralities)}"
    return None


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
    manifest: Manifest
    engine: InferenceEngine
    images: list[Dataset]


def route(
    bundles: Sequence[tuple[Manifest, InferenceEngine]],
    images: list[Dataset],
    rules: list[RouteRule],
    calling_ae: str | None = None,
) -> list[Route]:
    """One Route per applicable bundle, with the study's images that bundle takes (arrival order kept)."""
    out = []
    for manifest, engine in bundles:
        mine = [ds for ds in images if image_matches(manifest, ds)]
        if mine and allowed_by_rules(manifest.bundle_id, rules, mine, calling_ae):
            out.append(Route(manifest, engine, mine))
    return out


def describe(images: list[Dataset]) -> str:
    """What the study holds (modality / anatomy term per kind of image)."""
    kinds = sorted({f"{_tag(d, 'Modality') or '?'}/{region_of(d).term or '?'}" for d in images})
    return ", ".join(kinds) or "no images"


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
        shown = ", ".join(ids[:EXPLAIN_SAMPLES]) + (", …" if len(ids) > EXPLAIN_SAMPLES else "")
        noun = "image" if len(ids) == 1 else f"{len(ids)} images"
        parts.append(f"{noun} {shown}: {reasons}")
    return "no active model applies: " + " | ".join(parts)
