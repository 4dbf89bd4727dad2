"""Which active bundles apply to a completed study, and which of its images each one takes.

A bundle applies to an image when the image matches the manifest's ``applies_to`` (modality, body part,
view, SOP class; empty lists mean any) and the local config's route rules allow it. A study no bundle
applies to is recorded as ``no_model`` by the worker: that is a fact about the study, not an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from pydicom.dataset import Dataset

from appliance.core.config import RouteRule
from engines.manifest import Manifest


def _norm(values: list[str]) -> set[str]:
    return {v.strip().upper() for v in values}


def _tag(ds: Dataset, name: str) -> str:
    return str(ds.get(name, "") or "").strip().upper()


def modality_applies(manifest: Manifest, modality: str | None) -> bool:
    """The first check of :func:`image_matches`, from the modality alone (the receiver's header)."""
    return (modality or "").strip().upper() in _norm(manifest.applies_to.modalities)


def image_matches(manifest: Manifest, ds: Dataset) -> bool:
    a = manifest.applies_to
    if not modality_applies(manifest, _tag(ds, "Modality")):
        return False
    if a.body_parts and _tag(ds, "BodyPartExamined") not in _norm(a.body_parts):
        return False
    if a.views and _tag(ds, "ViewPosition") not in _norm(a.views):
        return False
    return not (a.sop_classes and str(ds.get("SOPClassUID", "")) not in set(a.sop_classes))


def _rule_matches(rule: RouteRule, images: list[Dataset], calling_ae: str | None) -> bool:
    if rule.calling_aes and (calling_ae or "").strip().upper() not in _norm(rule.calling_aes):
        return False
    if rule.modalities and not any(_tag(d, "Modality") in _norm(rule.modalities) for d in images):
        return False
    return not (rule.body_parts and not any(_tag(d, "BodyPartExamined") in _norm(rule.body_parts) for d in images))


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
    """What the study holds, for the ``no_model`` detail."""
    kinds = sorted({f"{_tag(d, 'Modality') or '?'}/{_tag(d, 'BodyPartExamined') or '?'}" for d in images})
    return ", ".join(kinds) or "no images"
