"""Site operating points signed by the central team: per bundle, the threshold of each label at one site.

WHO's guidance for TB chest X-ray CAD asks programmes to calibrate the threshold per setting; the central team
picks a site's thresholds from its calibration table and sends them to the site's boxes through the twin
(desired ``operating_points``: bundle id -> signed document). Like a recipient key set
(:mod:`appliance.cloud.keysets`, the same signing helpers, the same ``cloud.keyset_trusted_keys``), the box
accepts a document only when

- it is signed (Ed25519 over :data:`DOMAIN` + the canonical JSON text of the ``operating_point`` object) by a
  trusted central key;
- its ``version`` is not older than the newest the box ever accepted for that bundle (the same version again
  only with the same content), so an older operating point cannot be replayed;
- every label names a label of the bundle's active manifest that has a ``threshold_range``, and every threshold
  lies within that range (checked by the composition root's hook against the installed manifest, and again by
  postprocess when a study is judged).

A refused operating point leaves that bundle's operating point in force as it was and is reported
(``reported.operating_points_refused``, :mod:`appliance.cloud.overlay`); the rest of the desired document applies.
Signed form (what ``appliance central operating-point sign`` writes)::

    {"operating_point": "{\\"bundle_id\\":\\"cxr-phantom\\",\\"issued_at\\":1767225600,\\"site\\":\\"clinic-7\\",
                          \\"thresholds\\":{\\"nodule\\":0.4},\\"version\\":2}",
     "signer": "<16 hex key id>", "signature": "<base64 Ed25519 signature over DOMAIN + text>"}
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from appliance.cloud.keysets import CentralSigned, SignatureError, sign_text, verify_text

DOMAIN = b"clinic-appliance operating point v1\n"
MAX_LABELS = 64
BUNDLE_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}\Z")  # engines.manifest.BUNDLE_ID
SITE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._:/-]{0,63}\Z")
LABEL = re.compile(r"[A-Za-z0-9 _.,()/+-]{1,64}\Z")


class OperatingPointError(ValueError):
    """An operating point is refused; ``reason`` is a short code (``bad_format``, ``unknown_signer``,
    ``bad_signature``, ``replayed``, ``not_allowed``: unknown bundle/label or outside the manifest's range)."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"operating point refused ({reason}): {message}")
        self.reason = reason


class OperatingPoint(BaseModel):
    """The signed content: one bundle's thresholds (label -> score threshold after activation) at one site."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    version: int = Field(ge=1, le=2**53)
    issued_at: int = Field(ge=0)
    site: str = Field(min_length=1, max_length=64)
    bundle_id: str
    thresholds: dict[str, float] = Field(min_length=1, max_length=MAX_LABELS)

    @field_validator("site")
    @classmethod
    def _site(cls, v: str) -> str:
        if not SITE.match(v):
            raise ValueError("site must be 1-64 characters of letters, digits, space and ._:/-")
        return v

    @field_validator("bundle_id")
    @classmethod
    def _bundle(cls, v: str) -> str:
        if not BUNDLE_ID.match(v):
            raise ValueError("bundle_id must be lowercase letters, digits, '.', '_' or '-' (max 64)")
        return v

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, v: dict[str, float]) -> dict[str, float]:
        for label, value in v.items():
            if not LABEL.match(label):
                raise ValueError(f"label {label[:70]!r} is not 1-64 plain characters")
            if not math.isfinite(value):
                raise ValueError(f"threshold of {label!r} must be a finite number")
        return v


class SignedOperatingPoint(CentralSigned):
    """An :class:`OperatingPoint` as signed JSON text, its signer's key id and signature (what the twin carries)."""

    operating_point: str = Field(min_length=2, max_length=8192)


def canonical_content(op: OperatingPoint) -> str:
    """The canonical JSON text of an operating point (sorted keys, compact): what is signed and remembered."""
    return json.dumps(op.model_dump(), sort_keys=True, separators=(",", ":"))


def sign(op: OperatingPoint, private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """The signed form of ``op`` (JSON-ready), signed with a central key (:func:`keysets.sign_text`)."""
    text = canonical_content(op)
    return {"operating_point": text, **sign_text(DOMAIN, text, private_key)}


def parse(doc: Any) -> tuple[SignedOperatingPoint, OperatingPoint]:
    """Shape check of a signed operating point and of its content (no signature check). Raises
    :class:`OperatingPointError` (``bad_format``)."""
    try:
        signed = SignedOperatingPoint.model_validate(doc)
        return signed, OperatingPoint.model_validate_json(signed.operating_point)
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise OperatingPointError("bad_format", reasons) from exc


def verify(doc: Any, trusted: Mapping[str, str], *, newest: tuple[int, str] | None = None) -> OperatingPoint:
    """The operating point of ``doc`` once it is shown to come from the central team.

    ``trusted``: ``cloud.keyset_trusted_keys``. ``newest``: (version, canonical content) of the newest operating
    point accepted before for this bundle; an older version, or the same version with other content, is refused.
    Raises :class:`OperatingPointError`. (Whether the thresholds fit the bundle's manifest is the caller's check.)
    """
    signed, op = parse(doc)
    try:
        verify_text(DOMAIN, signed.operating_point, signed.signer, signed.signature, trusted)
    except SignatureError as exc:
        raise OperatingPointError(exc.reason, exc.detail) from exc
    if newest is not None:
        version, content = newest
        if op.version < version:
            raise OperatingPointError("replayed", f"{op.bundle_id} version {op.version} is older than {version}")
        if op.version == version and canonical_content(op) != content:
            raise OperatingPointError("replayed", f"{op.bundle_id} version {version} was accepted with other content")
    return op
