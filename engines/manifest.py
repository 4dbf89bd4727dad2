"""The model bundle manifest: what a bundle is, what it applies to, how to feed it and read it.

This is the contract between the central team (who build bundles), the engines (who compile and run
them) and the appliance pipeline (which preprocesses inputs and interprets outputs). The manifest's
canonical bytes (:func:`canonical_bytes`) are what the Ed25519 signature covers; they pin every file's
sha256, so one signature protects the whole bundle.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from engines.drift import EDGES, N_BINS

MANIFEST_SCHEMA = 1
# SemVer 2.0.0 (https://semver.org, section 9): a pre-release is dot-separated identifiers, each numeric without
# leading zeros or alphanumeric; build metadata is not accepted (it would not take part in precedence, section 10).
# Every identifier pattern here is ASCII ([0-9], never \d, which matches any Unicode digit: "1\u0663" is int 13) and
# ends in \Z, never $ (which also matches before a final newline): ``.match`` then means the whole string.
_PRE_ID = r"(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)"
SEMVER = re.compile(rf"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(?:-({_PRE_ID}(?:\.{_PRE_ID})*))?\Z")
BUNDLE_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\Z")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}\Z")
# A file of a bundle: relative, "/"-separated parts of letters, digits, "_", "." and "-", none starting with "."
# or "-" (so no "..", no hidden files, no option-like names); the tar member name and the path in ``files``.
MEMBER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*\Z")
# The threshold of a scores label the manifest names none for (score >= threshold is positive).
DEFAULT_THRESHOLD = 0.5
# Golden tolerances are bounded: an atol or rtol of, say, 1e9 would let ANY model pass the golden check (the check
# is what ties the compiled engine to the signed reference outputs). 0.1 is twice the loosest tolerance the
# reference bundles use (fp16: 5e-2); a model that needs more is not reproducing its reference outputs.
MAX_GOLDEN_ATOL = 0.1
MAX_GOLDEN_RTOL = 0.1
# A bundle member can be no larger than this (ONNX's protobuf limit is 2 GiB; bigger weights go in external data).
MAX_FILE_BYTES = 2 * 1024**3
# How far into the future a manifest may expire (a signed bundle that never expires can be replayed for ever).
MAX_VALIDITY_DAYS = 10 * 366


class _Strict(BaseModel):
    # allow_inf_nan=False: NaN, Infinity and -Infinity are refused in every float field (a NaN threshold never
    # fires; a NaN tolerance makes every comparison false, so nothing can fail the golden check).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def parse_utc(value: str) -> dt.datetime:
    """An ISO 8601 UTC timestamp (``2026-01-31T12:00:00Z``, or with ``+00:00``; fractions allowed) -> aware
    datetime. Raises ValueError for anything else (no offset, another offset, not a date)."""
    if not isinstance(value, str) or not value.endswith(("Z", "+00:00")):
        raise ValueError(f"not an ISO 8601 UTC time (ending in 'Z' or '+00:00'): {value!r}")
    try:
        parsed = dt.datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)
    except ValueError as exc:
        raise ValueError(f"not an ISO 8601 UTC time: {value!r}") from exc
    return parsed.astimezone(dt.timezone.utc)


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


# Image Type (0008,0008) and Conversion Type (0008,0064) values are Code Strings (PS3.5 6.2: upper case, digits,
# space, underscore; at most 16 characters).
_CODE_STRING = re.compile(r"^[A-Z0-9 _]{1,16}\Z")
PRESENTATION_INTENTS = ("FOR PRESENTATION", "FOR PROCESSING")  # Presentation Intent Type (0008,0068) enumerated values


class InputContract(_Strict):
    """The intended use a bundle was validated for, beyond ``AppliesTo``'s modality / SOP class / anatomy / view /
    laterality: image kind, population and encoding. The router refuses every image outside it, per image, with
    a reason in the standard's terms (``appliance.pipeline.router.refusal_detail``). Empty lists and None mean
    "not restricted".

    - ``presentation_intents``: Presentation Intent Type (0008,0068) values taken (PS3.3 C.8.11.1.1.1: DX, MG and
      IO images carry it; an image without the attribute, e.g. CR or SC, is not refused by it: its SOP class is).
    - ``refused_image_types``: Image Type (0008,0008) patterns refused, each values joined by ``\\`` (e.g.
      ``DERIVED\\SECONDARY``): an image is refused when its Image Type holds every value of a pattern.
    - ``refused_conversion_types``: Conversion Type (0008,0064) values refused (PS3.3 C.8.6.1: ``WSD``
      workstation = a screen capture, ``SD`` scanned document, ``SI`` scanned image, ``DF`` digitised film,
      ``DV`` digitised video, ``DRW`` drawing, ``SYN`` synthetic).
    - ``refuse_burned_in_annotation``: Burned In Annotation (0028,0301) ``YES`` refused (text in the pixels).
    - ``min_age_years`` / ``max_age_years``: the patient's age in completed years, both bounds inclusive
      (``min 15``: 15Y taken, 14Y refused; ``max 80``: 80Y taken, 81Y refused). The age is Patient's Age
      (0010,1010) (nnnD/W/M/Y, PS3.5 6.2 AS), else computed from Patient's Birth Date (0010,0030) and Study
      Date (0008,0020). ``unknown_age`` decides an image whose age cannot be read (checked only when a bound
      is set).
    - ``min_rows`` .. ``max_columns``: Rows (0028,0010) / Columns (0028,0011) bounds, inclusive.
    - ``bits_stored``: Bits Stored (0028,0101) values taken. ``photometric_interpretations``: Photometric
      Interpretation (0028,0004) values taken (e.g. MONOCHROME1, MONOCHROME2).
    """

    presentation_intents: list[Literal["FOR PRESENTATION", "FOR PROCESSING"]] = Field(default_factory=list)
    refused_image_types: list[str] = Field(default_factory=list)
    refused_conversion_types: list[str] = Field(default_factory=list)
    refuse_burned_in_annotation: bool = False
    min_age_years: int | None = Field(default=None, ge=0, le=200)
    max_age_years: int | None = Field(default=None, ge=0, le=200)
    unknown_age: Literal["accept", "refuse"] = "accept"
    min_rows: int | None = Field(default=None, ge=1, le=65535)
    max_rows: int | None = Field(default=None, ge=1, le=65535)
    min_columns: int | None = Field(default=None, ge=1, le=65535)
    max_columns: int | None = Field(default=None, ge=1, le=65535)
    bits_stored: list[int] = Field(default_factory=list)
    photometric_interpretations: list[str] = Field(default_factory=list)

    @field_validator("refused_image_types")
    @classmethod
    def _image_types(cls, v: list[str]) -> list[str]:
        for pattern in v:
            parts = pattern.split("\\")
            if not all(_CODE_STRING.match(p) for p in parts):
                raise ValueError(f"Image Type pattern {pattern!r}: values must be DICOM Code Strings joined by '\\'")
        return v

    @field_validator("refused_conversion_types", "photometric_interpretations")
    @classmethod
    def _code_strings(cls, v: list[str]) -> list[str]:
        bad = [x for x in v if not _CODE_STRING.match(x)]
        if bad:
            raise ValueError(f"not DICOM Code Strings: {bad}")
        return v

    @field_validator("bits_stored")
    @classmethod
    def _bits(cls, v: list[int]) -> list[int]:
        if any(not 1 <= b <= 32 for b in v):
            raise ValueError("bits_stored values must be 1..32")
        return v

    @model_validator(mode="after")
    def _ranges(self) -> InputContract:
        for lo, hi in (("min_age_years", "max_age_years"), ("min_rows", "max_rows"), ("min_columns", "max_columns")):
            a, b = getattr(self, lo), getattr(self, hi)
            if a is not None and b is not None and a > b:
                raise ValueError(f"{lo} ({a}) is above {hi} ({b})")
        return self


# Fields added to AppliesTo after reference bundles were signed: left out of the canonical form while at their
# default, so that every manifest signed before them keeps its exact canonical bytes (and its signature).
_APPLIES_TO_EXTENSIONS: dict[str, Any] = {
    "view_codes": [],
    "view_modifiers": None,
    "anatomy_codes": [],
    "lateralities": [],
    "input_contract": None,
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
    # The intended use beyond the fields above (image kind, population, encoding): None = the bundle declares
    # none (``appliance model list`` warns); see InputContract.
    input_contract: InputContract | None = None

    @model_serializer(mode="wrap")
    def _canonical(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for key, default in _APPLIES_TO_EXTENSIONS.items():
            if key in data and data[key] == default:
                del data[key]
        return data


# Patient Orientation (0020,0020) direction letters (PS3.3 C.7.6.1.1.1, biped): Left, Right, Anterior, Posterior,
# Head, Foot; each letter's opposite.
OPPOSITE_DIRECTION = {"L": "R", "R": "L", "A": "P", "P": "A", "H": "F", "F": "H"}
Direction = Literal["L", "R", "A", "P", "H", "F"]


class Orientation(_Strict):
    """The orientation the model was trained on, in Patient Orientation (0020,0020) terms (PS3.3 C.7.6.1.1.1).

    ``rows``: the directions the rows may run toward (increasing column index: Patient Orientation's FIRST
    value); ``columns``: toward which the columns run (increasing row index: its SECOND value). Each is a list of
    alternatives ("any of"), so one entry can cover several views: the mammography model takes a left breast
    with rows toward Anterior and columns toward Feet (MLO) or toward patient Right (CC). No list may hold a
    direction and its opposite, and no direction of ``rows`` may lie on the axis of one of ``columns``: then one
    rotation/flip at most brings an image there. ``oblique``: whether an image whose Patient Orientation values
    carry refinement letters (a principal letter then one or two more, e.g. an MLO's ``A\\FR``) is taken, by its
    principal letters; False refuses such an image (its content is rotated off the pixel axes).
    """

    rows: list[Direction] = Field(min_length=1, max_length=2)
    columns: list[Direction] = Field(min_length=1, max_length=2)
    oblique: bool = False

    @model_validator(mode="after")
    def _unambiguous(self) -> Orientation:
        for name, letters in (("rows", self.rows), ("columns", self.columns)):
            if len(set(letters)) != len(letters) or any(OPPOSITE_DIRECTION[d] in letters for d in letters):
                raise ValueError(f"orientation {name} {letters} repeats a direction or holds one and its opposite")
        row_axes = {frozenset((d, OPPOSITE_DIRECTION[d])) for d in self.rows}
        col_axes = {frozenset((d, OPPOSITE_DIRECTION[d])) for d in self.columns}
        if row_axes & col_axes:
            raise ValueError(f"orientation rows {self.rows} and columns {self.columns} share an axis")
        return self


# Fields added to Preprocessing after reference bundles were signed: left out of the canonical form while at their
# default (same rule as _APPLIES_TO_EXTENSIONS).
_PREPROCESSING_EXTENSIONS: dict[str, Any] = {"orientation": None}


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
    # The orientation the model was trained on, per Image Laterality (0020,0062) ("L", "R"; "*" = any image, and
    # every image whose laterality has no entry of its own). None = images are given to the model as stored
    # (bundles signed before this field). See ``appliance.pipeline.preprocess.orientation_matrix``.
    orientation: dict[Literal["*", "L", "R"], Orientation] | None = Field(default=None, min_length=1)

    @model_serializer(mode="wrap")
    def _canonical(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for key, default in _PREPROCESSING_EXTENSIONS.items():
            if key in data and data[key] == default:
                del data[key]
        return data


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
    # scores only: label -> [lo, hi], the closed range a site operating point (signed by the central team, see
    # docs/CLOUD.md) may set that label's threshold to; a label without a range keeps the manifest's threshold.
    # Left out of the canonical bytes while empty (manifests signed before it verify unchanged).
    threshold_range: dict[str, tuple[float, float]] = Field(default_factory=dict)

    @model_serializer(mode="wrap")
    def _canonical(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if not data.get("threshold_range"):
            data.pop("threshold_range", None)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> OutputSpec:
        unknown = set(self.thresholds) - set(self.labels)
        if unknown:
            raise ValueError(f"thresholds for unknown labels: {sorted(unknown)}")
        if self.kind == "heatmap" and not self.stride:
            raise ValueError("heatmap outputs need a stride")
        if self.threshold_range and self.kind != "scores":
            raise ValueError("threshold_range is for scores outputs only")
        unknown = set(self.threshold_range) - set(self.labels)
        if unknown:
            raise ValueError(f"threshold_range for unknown labels: {sorted(unknown)}")
        for label, (lo, hi) in self.threshold_range.items():
            if not lo <= hi:
                raise ValueError(f"threshold_range of {label!r}: low {lo} is above high {hi}")
            if self.activation != "none" and not (lo >= 0.0 and hi <= 1.0):
                raise ValueError(f"threshold_range of {label!r}: {self.activation} scores lie in [0, 1]")
            default = self.thresholds.get(label, DEFAULT_THRESHOLD)
            if not lo <= default <= hi:
                raise ValueError(f"threshold_range of {label!r} [{lo}, {hi}] leaves out its own threshold {default}")
        return self

    def threshold(self, label: str) -> float:
        """The manifest's threshold of ``label`` (:data:`DEFAULT_THRESHOLD` when it names none)."""
        return float(self.thresholds.get(label, DEFAULT_THRESHOLD))


class Tolerance(_Strict):
    """Golden-check tolerances of one output at one precision: finite, 0 <= atol <= MAX_GOLDEN_ATOL and
    0 <= rtol <= MAX_GOLDEN_RTOL (absolute in output units, relative as a fraction of the golden value)."""

    atol: float = Field(ge=0, le=MAX_GOLDEN_ATOL)
    rtol: float = Field(ge=0, le=MAX_GOLDEN_RTOL)


# A reference histogram's count, and its ``n``: the studies of a validation set, far below MAX_COUNT; a bigger int
# (JSON allows any) would overflow the drift check's floats (``engines.drift``) each time the box compares.
MAX_COUNT = 10**12
Count = Annotated[int, Field(strict=True, ge=0, le=MAX_COUNT)]  # an int (not a bool, float or string), 0..MAX_COUNT


def _check_edges(v: list[float]) -> list[float]:
    if len(v) != N_BINS + 1 or any(b <= a for a, b in zip(v, v[1:], strict=False)):
        raise ValueError(f"edges must be {N_BINS + 1} strictly increasing numbers")
    if any(abs(a - b) > 1e-9 for a, b in zip(v, EDGES, strict=True)):
        raise ValueError(f"edges must be the box's fixed bins {list(EDGES)} (engines.drift.EDGES)")
    return v


def _check_counts(v: list[int]) -> list[int]:
    if len(v) != N_BINS:
        raise ValueError(f"a histogram is {N_BINS} counts, found {len(v)}")
    if sum(v) <= 0:
        raise ValueError("a histogram of the reference is empty")
    return v


class Reference(_Strict):
    """A bundle's validation-set distributions (``engines.drift.reference_distributions`` builds it): 20-bin
    histograms over the fixed edges ``engines.drift.EDGES`` of each label's image score, the study score, and the
    per-image mean and 95th percentile of the preprocessed input in [0, 1]. ``n``: studies in the validation set."""

    n: int = Field(strict=True, ge=1, le=MAX_COUNT)
    score_edges: list[float]
    scores: dict[str, list[Count]] = Field(default_factory=dict)
    study_score: list[Count]
    input_edges: list[float]
    input_mean: list[Count]
    input_p95: list[Count]

    _edges = field_validator("score_edges", "input_edges")(_check_edges)
    _counts = field_validator("study_score", "input_mean", "input_p95")(_check_counts)

    @field_validator("scores")
    @classmethod
    def _score_counts(cls, v: dict[str, list[int]]) -> dict[str, list[int]]:
        for label, counts in v.items():
            try:
                _check_counts(counts)
            except ValueError as exc:
                raise ValueError(f"scores[{label!r}]: {exc}") from exc
        return v


class DriftPolicy(_Strict):
    """When the box calls a site's window drifted from the reference: a metric alerts when its PSI is at least
    ``psi_alert`` AND its KS p-value is below ``p_alert``, once the window of ``window_days`` UTC days holds at
    least ``min_studies`` studies (``engines.drift.compare``)."""

    psi_alert: float = Field(default=0.25, gt=0, le=10)
    p_alert: float = Field(default=0.01, gt=0, lt=1)
    min_studies: int = Field(default=50, strict=True, ge=1, le=1_000_000)
    window_days: int = Field(default=7, strict=True, ge=1, le=90)


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
    # ISO 8601 UTC: the box refuses the bundle after this time (install, verify and every load); signed, so a
    # stale bundle cannot be replayed for ever. At most MAX_VALIDITY_DAYS after ``created``.
    expires: str
    files: dict[str, str]  # relative path -> sha256 hex; must include model.onnx and golden.npz
    # relative path -> exact size in bytes (same keys as ``files``): the box reads no more than this of each
    # member while it streams and hashes it.
    file_sizes: dict[str, int]

    @model_validator(mode="before")
    @classmethod
    def _encodable(cls, data: Any) -> Any:
        """Every text of the manifest, keys and nested fields included, encodes as UTF-8 (its canonical bytes
        are UTF-8): also for a manifest built from Python objects rather than parsed (:func:`check_json_values`)."""
        check_json_values(data)
        return data

    @field_validator("created", "expires")
    @classmethod
    def _utc(cls, v: str) -> str:
        parse_utc(v)
        return v

    @field_validator("files")
    @classmethod
    def _digests(cls, v: dict[str, str]) -> dict[str, str]:
        bad = sorted(name for name, digest in v.items() if not SHA256_HEX.match(digest))
        if bad:
            raise ValueError(f"files: not a lower-case sha256 hex digest for {bad}")
        return v

    @field_validator("file_sizes")
    @classmethod
    def _sizes(cls, v: dict[str, int]) -> dict[str, int]:
        bad = sorted(name for name, size in v.items() if not 0 <= size <= MAX_FILE_BYTES)
        if bad:
            raise ValueError(f"file_sizes: out of range 0..{MAX_FILE_BYTES} for {bad}")
        return v

    # Triage: label -> score at or above which a positive finding makes the study urgent (flagged in the worklist,
    # the SC banner and the SR, and sent to the cloud first). Left out of the canonical bytes while empty, so
    # manifests signed before it verify unchanged; a box older than it refuses a manifest that sets it.
    urgent: dict[str, float] = Field(default_factory=dict)
    # Drift monitoring (issue 17): the validation set's distributions and the thresholds the box compares its
    # recent window with. Left out of the canonical bytes while unset, like ``urgent``.
    reference: Reference | None = None
    drift: DriftPolicy | None = None

    @model_serializer(mode="wrap")
    def _canonical(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if not data.get("urgent"):
            data.pop("urgent", None)
        for key in ("reference", "drift"):
            if data.get(key) is None:
                data.pop(key, None)
        return data

    @property
    def drift_policy(self) -> DriftPolicy:
        """The manifest's drift thresholds, or the defaults when it ships a reference without them."""
        return self.drift or DriftPolicy()

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
            if not MEMBER_NAME.match(path) or path in ("manifest.json", "signature"):
                raise ValueError(f"bad file path in manifest: {path!r}")
        # a name that is also a directory of another ("assets" and "assets/x") cannot be unpacked
        dirs = {"/".join(parts[:i]) for parts in (p.split("/") for p in self.files) for i in range(1, len(parts))}
        clash = sorted(dirs & set(self.files))
        if clash:
            raise ValueError(f"files {clash} are also directories of other files")
        if set(self.file_sizes) != set(self.files):
            raise ValueError("file_sizes must name exactly the files in files")
        created, expires = parse_utc(self.created), parse_utc(self.expires)
        if expires <= created:
            raise ValueError("expires must be after created")
        if expires - created > dt.timedelta(days=MAX_VALIDITY_DAYS):
            raise ValueError(f"expires more than {MAX_VALIDITY_DAYS} days after created")
        scored = {label for o in self.outputs if o.kind == "scores" for label in o.labels}
        unknown = sorted(set(self.urgent) - scored)
        if unknown:
            raise ValueError(f"urgent thresholds for labels no scores output has: {unknown}")
        if self.reference is not None:
            unknown = sorted(set(self.reference.scores) - scored)
            if unknown:
                raise ValueError(f"reference scores for labels no scores output has: {unknown}")
        if self.drift is not None and self.reference is None:
            raise ValueError("drift thresholds without a reference to compare with")
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

    def expired(self, now: dt.datetime | None = None) -> bool:
        """True once ``now`` (default: the current UTC time) is at or past ``expires``."""
        return (now or dt.datetime.now(dt.timezone.utc)) >= parse_utc(self.expires)


def version_key(version: str) -> tuple:
    """Sort key implementing SemVer 2.0.0 precedence (section 11): the ONE version comparison of the engines.

    major, minor, patch compare numerically; a version with a pre-release sorts before the same version without
    one (1.0.0-rc.1 < 1.0.0); pre-release identifiers compare left to right, numeric ones numerically
    (rc.9 < rc.10), alphanumeric ones in ASCII order, a numeric identifier before an alphanumeric one, and a
    shorter list before a longer one with the same start (1.0.0-alpha < 1.0.0-alpha.1). Raises ValueError for
    a string that is not a semantic version."""
    m = SEMVER.match(version) if isinstance(version, str) else None
    if not m:
        raise ValueError(f"not a semantic version: {version!r}")
    major, minor, patch, pre = m.groups()
    if pre is None:
        return (int(major), int(minor), int(patch), 1, ())
    ids = tuple((0, int(i), "") if i.isascii() and i.isdigit() else (1, 0, i) for i in pre.split("."))
    return (int(major), int(minor), int(patch), 0, ids)


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as ``a`` has lower, equal or higher SemVer 2.0.0 precedence than ``b`` (see version_key)."""
    ka, kb = version_key(a), version_key(b)
    return (ka > kb) - (ka < kb)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} is not allowed in a manifest")


def loads_strict(raw: bytes | str) -> Any:
    """``json.loads`` that refuses NaN, Infinity and -Infinity (Python's json accepts them by default;
    RFC 8259 JSON has no such numbers), floats that overflow to infinity (``1e999``) and text that cannot be
    encoded as UTF-8 (:func:`check_json_values`). Raises ValueError, also for nesting deeper than Python's
    parser follows (``json`` itself raises RecursionError: these bytes are read before anything authenticated
    them)."""
    try:
        doc = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError as exc:
        raise ValueError("JSON nested too deep") from exc
    check_json_values(doc)
    return doc


def _shown(key: str) -> str:
    """A JSON key as it may be printed: a lone surrogate is written as its escape (``\\ud800``)."""
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def check_json_values(doc: Any) -> None:
    """Refuse what parsed JSON may hold but a manifest (or signature file) must not: a non-finite number, and
    text that cannot be encoded as UTF-8, i.e. a lone surrogate code point (U+D800..U+DFFF) in any string
    value or key at any depth. JSON can carry one as an escape (``"\\ud800"``; RFC 8259 section 8.2 leaves
    its handling unpredictable) and Python's json decodes UTF-8 bytes with ``surrogatepass``, so such text
    would otherwise fail later, where it is encoded (canonical bytes, a log line, the terminal). Walks
    iteratively (no recursion limit). Raises ValueError naming where, never quoting the text."""
    stack: list[tuple[Any, str]] = [(doc, "")]
    while stack:
        node, where = stack.pop()
        if isinstance(node, float) and not math.isfinite(node):
            raise ValueError("non-finite number is not allowed in a manifest")
        if isinstance(node, str):
            _check_encodable(node, where)
        elif isinstance(node, dict):
            for key, value in node.items():
                path = f"{where}.{_shown(key)}" if where else _shown(key)
                if isinstance(key, str):
                    _check_encodable(key, f"key {path}")
                stack.append((value, path))
        elif isinstance(node, list):
            stack.extend((value, f"{where}[{i}]") for i, value in enumerate(node))


def _check_encodable(text: str, where: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        place = where or "the top level"
        raise ValueError(f"text at {place} cannot be encoded as UTF-8 (unpaired surrogate)") from None


def parse_manifest_bytes(raw: bytes) -> Manifest:
    """Parse and validate manifest bytes strictly (no NaN/Infinity). Raises ValueError or pydantic's
    ValidationError (a ValueError) on anything not a valid manifest."""
    return Manifest.model_validate(loads_strict(raw))


def canonical_bytes(manifest: Manifest) -> bytes:
    """The exact bytes that are signed: sorted keys, no whitespace, UTF-8."""
    doc = manifest.model_dump(mode="json")
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def check_site_thresholds(manifest: Manifest, thresholds: dict[str, float]) -> None:
    """Raise ValueError unless every ``label -> threshold`` of a site operating point names a label of the
    manifest's scores output that has a ``threshold_range`` and lies within it (closed range, finite)."""
    spec = manifest.output("scores")
    if spec is None:
        raise ValueError(f"bundle {manifest.bundle_id} {manifest.version} has no scores output")
    for label, value in thresholds.items():
        if label not in spec.labels:
            raise ValueError(f"{manifest.bundle_id} {manifest.version} has no label {label!r}")
        rng = spec.threshold_range.get(label)
        if rng is None:
            raise ValueError(f"{manifest.bundle_id} {manifest.version} allows no site threshold for {label!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"threshold of {label!r} is not a finite number")
        if not rng[0] <= value <= rng[1]:
            raise ValueError(
                f"threshold {value} of {label!r} is outside the range [{rng[0]}, {rng[1]}] "
                f"{manifest.bundle_id} {manifest.version} allows"
            )
