"""The model bundle manifest: what a bundle is, what it applies to, how to feed it and read it.

This is the contract between the central team (who build bundles), the engines (who compile and run
them) and the appliance pipeline (which preprocesses inputs and interprets outputs). The manifest's
canonical bytes (:func:`canonical_bytes`) are what the Ed25519 signature covers; they pin every file's
sha256, so one signature protects the whole bundle.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

MANIFEST_SCHEMA = 1
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-([0-9A-Za-z.-]+))?$")
BUNDLE_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CodeRef(_Strict):
    """A coded concept as a DICOM Code Sequence item carries it (PS3.3 Section 8.8, Table 8.8-1): Code Value
    (0008,0100) and Coding Scheme Designator (0008,0102); ``meaning`` (Code Meaning) is for people only.

    SNOMED concepts may be given with either designator, ``SCT`` (SNOMED CT identifiers) or the retired ``SRT``
    (SNOMED-RT identifiers, PS3.16 Section 8); the router treats the two as the same concept."""

    value: str = Field(min_length=1, max_length=64)
    scheme_designator: str = Field(min_length=1, max_length=16)
    meaning: str = ""

    @field_validator("value", "scheme_designator")
    @classmethod
    def _trim(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("must not be blank")
        return v


# Fields added to AppliesTo after reference bundles were signed: left out of the canonical form while at their
# default, so that every manifest signed before them keeps its exact canonical bytes (and its signature).
_APPLIES_TO_EXTENSIONS: dict[str, Any] = {
    "view_codes": [],
    "view_modifiers": None,
    "anatomy_codes": [],
    "lateralities": [],
}


class AppliesTo(_Strict):
    """Which images a bundle takes. Empty list = any. Strings are matched case-insensitively.

    Views and anatomy may be stated as strings (View Position (0018,5101) / Body Part Examined (0018,0015)
    defined terms), as codes (View Code Sequence (0054,0220), PS3.16 CID 4010 / CID 4014; Anatomic Region
    Sequence (0008,2218), CID 4009 / CID 4031), or both: an image is taken when its view (anatomy) matches any
    of them, each string standing also for its codes and each code for its string (``appliance.pipeline.anatomy``).
    """

    modalities: list[str] = Field(min_length=1)  # e.g. ["DX", "CR"], ["MG"]
    body_parts: list[str] = Field(default_factory=list)  # BodyPartExamined terms, e.g. ["CHEST"]
    views: list[str] = Field(default_factory=list)  # ViewPosition terms, e.g. ["PA", "AP"], ["CC", "MLO"]
    sop_classes: list[str] = Field(default_factory=list)  # SOP Class UIDs
    view_codes: list[CodeRef] = Field(default_factory=list)  # View Code Sequence concepts
    # View Modifier Code Sequence (0054,0222) concepts an image may carry (CID 4011 / CID 4015): None = any
    # modifier; [] = images with a view modifier (spot compression, magnification, ...) are not taken.
    view_modifiers: list[CodeRef] | None = None
    anatomy_codes: list[CodeRef] = Field(default_factory=list)  # Anatomic Region Sequence concepts
    # Image / frame / series laterality the image must have (PS3.3 C.8.11.7, C.7.6.16.2.8, C.7.3.1): e.g.
    # ["L", "R"] = one breast per image; empty = any, unknown included.
    lateralities: list[Literal["L", "R", "B"]] = Field(default_factory=list)

    @model_serializer(mode="wrap")
    def _canonical(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for key, default in _APPLIES_TO_EXTENSIONS.items():
            if key in data and data[key] == default:
                del data[key]
        return data


class Preprocessing(_Strict):
    """How a DICOM image becomes the input tensor. The pipeline implements exactly this."""

    target_size: tuple[int, int]  # (height, width) of the tensor
    keep_aspect: bool = True  # scale to fit, then pad (centred) to target_size
    pad_value: float = 0.0  # in normalised [0, 1] intensity, before mean/std
    # window: "dicom" = VOI LUT / WindowCenter+Width from the header, falling back to "minmax";
    # "minmax" = stored-value range; "percentile" = [p_low, p_high] percentiles of the image.
    window: Literal["dicom", "minmax", "percentile"] = "dicom"
    percentiles: tuple[float, float] = (0.5, 99.5)
    invert_monochrome1: bool = True  # MONOCHROME1 is inverted so that bright = dense always
    mean: float = 0.0  # after windowing to [0, 1]: x = (x - mean) / std
    std: float = 1.0


class InputSpec(_Strict):
    name: str
    shape: tuple[int | str, int, int, int]  # (batch, channels, H, W); batch may be a name ("N") = dynamic
    dtype: Literal["float32", "float16"] = "float32"
    preprocessing: Preprocessing

    @model_validator(mode="after")
    def _size_matches(self) -> InputSpec:
        if tuple(self.shape[2:]) != tuple(self.preprocessing.target_size):
            raise ValueError("shape[2:] must equal preprocessing.target_size")
        return self


class OutputSpec(_Strict):
    """One output tensor.

    kind "scores": shape (N, len(labels)) logits or probabilities, per-label thresholds.
    kind "heatmap": shape (N, len(labels), h, w), one map per label; ``stride`` input pixels per cell.
    """

    name: str
    kind: Literal["scores", "heatmap"]
    labels: list[str] = Field(min_length=1)
    activation: Literal["sigmoid", "softmax", "none"] = "sigmoid"
    thresholds: dict[str, float] = Field(default_factory=dict)  # scores only: operating points
    stride: int | None = None  # heatmap only

    @model_validator(mode="after")
    def _consistent(self) -> OutputSpec:
        unknown = set(self.thresholds) - set(self.labels)
        if unknown:
            raise ValueError(f"thresholds for unknown labels: {sorted(unknown)}")
        if self.kind == "heatmap" and not self.stride:
            raise ValueError("heatmap outputs need a stride")
        return self


class Tolerance(_Strict):
    atol: float = Field(ge=0)
    rtol: float = Field(ge=0)


class Manifest(_Strict):
    schema_version: int = MANIFEST_SCHEMA
    bundle_id: str
    version: str
    task: str  # "cxr", "mmg", ...
    title: str
    clinical_use: bool = False  # reference bundles: False -> "NOT FOR CLINICAL USE" on every output
    applies_to: AppliesTo
    inputs: list[InputSpec] = Field(min_length=1, max_length=1)
    outputs: list[OutputSpec] = Field(min_length=1)
    # per output name, per precision ("fp32", "fp16"): tolerances for the golden check
    golden_tolerances: dict[str, dict[str, Tolerance]]
    min_appliance_version: str = "0.1.0"
    created: str  # ISO 8601 UTC
    files: dict[str, str]  # relative path -> sha256 hex; must include model.onnx and golden.npz
    # Triage: label -> score at or above which a positive finding makes the study urgent (flagged in the worklist,
    # the SC banner and the SR, and sent to the cloud first). Left out of the canonical bytes while empty, so
    # manifests signed before it verify unchanged; a box older than it refuses a manifest that sets it.
    urgent: dict[str, float] = Field(default_factory=dict)

    @model_serializer(mode="wrap")
    def _canonical(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if not data.get("urgent"):
            data.pop("urgent", None)
        return data

    @field_validator("urgent")
    @classmethod
    def _urgent_values(cls, v: dict[str, float]) -> dict[str, float]:
        for label, threshold in v.items():
            if not math.isfinite(threshold):
                raise ValueError(f"urgent threshold of {label!r} must be a finite number")
        return v

    @field_validator("bundle_id")
    @classmethod
    def _bundle_id(cls, v: str) -> str:
        if not BUNDLE_ID.match(v):
            raise ValueError("bundle_id must be lowercase letters, digits, '.', '_' or '-' (max 64)")
        return v

    @field_validator("version", "min_appliance_version")
    @classmethod
    def _semver(cls, v: str) -> str:
        if not SEMVER.match(v):
            raise ValueError(f"not a semantic version: {v!r}")
        return v

    @model_validator(mode="after")
    def _files(self) -> Manifest:
        for required in ("model.onnx", "golden.npz"):
            if required not in self.files:
                raise ValueError(f"files must include {required}")
        for path in self.files:
            if path.startswith("/") or ".." in path.split("/") or path == "manifest.json":
                raise ValueError(f"bad file path in manifest: {path!r}")
        scored = {label for o in self.outputs if o.kind == "scores" for label in o.labels}
        unknown = sorted(set(self.urgent) - scored)
        if unknown:
            raise ValueError(f"urgent thresholds for labels no scores output has: {unknown}")
        names = {o.name for o in self.outputs}
        missing = names - set(self.golden_tolerances)
        if missing:
            raise ValueError(f"golden_tolerances missing for outputs: {sorted(missing)}")
        return self

    @property
    def input(self) -> InputSpec:
        return self.inputs[0]

    def output(self, kind: str) -> OutputSpec | None:
        return next((o for o in self.outputs if o.kind == kind), None)


def version_key(version: str) -> tuple:
    """Sort key for semantic versions (a pre-release sorts before its release)."""
    m = SEMVER.match(version)
    if not m:
        raise ValueError(f"not a semantic version: {version!r}")
    major, minor, patch, pre = m.groups()
    return (int(major), int(minor), int(patch), 0 if pre else 1, pre or "")


def canonical_bytes(manifest: Manifest) -> bytes:
    """The exact bytes that are signed: sorted keys, no whitespace, UTF-8."""
    doc = manifest.model_dump(mode="json")
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
