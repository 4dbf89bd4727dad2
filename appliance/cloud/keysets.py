"""Recipient key sets signed by the central team: the only way new result-encryption keys reach a box remotely.

Whoever can write the device twin must not be able to choose who reads the box's results. So the twin never
carries raw keys: it carries a *signed key set* (``recipient_keyset``) that the box accepts only when

- it is signed (Ed25519, over the canonical JSON of the ``keyset`` object with a domain-separation prefix) by a
  key in ``cloud.keyset_trusted_keys`` (key id -> base64 Ed25519 public key, set at provisioning; the key id is
  the first 16 hex digits of the SHA-256 of the raw public key, as for bundle signing keys);
- it has not expired (``expires_at``, epoch seconds);
- its ``version`` is newer than the newest the box ever accepted (the same version again is accepted only with
  the same content), so an older set cannot be replayed.

The twin may then *choose* among the keys of the set in force (``recipient_key_ids``), never add one. The
technician's ``cloud.recipient_keys`` (the config file) remains a trusted source: it is in force while no signed
set is. Signed form (what ``appliance central keyset sign`` writes and the twin carries); the key set travels as
one JSON *string*, because the twin merges nested objects of a desired patch (JSON merge patch) and a string is
replaced whole, and because the signature covers exactly these bytes::

    {"keyset": "{\"expires_at\":1798761600,\"issued_at\":1767225600,\"keys\":{\"central-2026\":\"<b64>\"},
                 \"version\":3}",
     "signer": "<16 hex key id>", "signature": "<base64 Ed25519 signature over DOMAIN + keyset bytes>"}
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from appliance.cloud import crypto
from engines.keys import key_id

DOMAIN = b"clinic-appliance recipient keyset v1\n"
KID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
MAX_KEYS = 16


class KeySetError(ValueError):
    """A key set is refused; ``reason`` is a short code (``bad_format``, ``unknown_signer``, ``bad_signature``,
    ``expired``, ``replayed``), the message says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"recipient key set refused ({reason}): {message}")
        self.reason = reason


class KeySet(BaseModel):
    """The signed content: recipient key id -> base64 X25519 public key, a version and a validity period."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(ge=1, le=2**53)
    issued_at: int = Field(ge=0)
    expires_at: int = Field(ge=0)
    keys: dict[str, str] = Field(min_length=1, max_length=MAX_KEYS)

    @field_validator("keys")
    @classmethod
    def _keys(cls, v: dict[str, str]) -> dict[str, str]:
        for kid, pub in v.items():
            if not KID.match(kid):
                raise ValueError(f"recipient key id {kid[:70]!r} is not 1-64 characters of [A-Za-z0-9._-]")
            try:
                crypto.load_public_key(pub)
            except Exception as exc:
                raise ValueError(f"recipient key {kid!r} is not a base64 X25519 public key ({exc})") from exc
        return v


class CentralSigned(BaseModel):
    """The signer's key id and signature (:func:`sign_text`) that every central-signed twin document carries
    beside its JSON text (the subclass names that text's field)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    signer: str = Field(pattern=r"^[0-9a-f]{16}$")
    signature: str = Field(min_length=1, max_length=200)


class SignedKeySet(CentralSigned):
    """A :class:`KeySet` as signed JSON text, with its signer's key id and signature (what the twin carries)."""

    keyset: str = Field(min_length=2, max_length=8192)

    def content(self) -> KeySet:
        """The key set the text holds (shape checked)."""
        return KeySet.model_validate_json(self.keyset)


def sign(keyset: KeySet, private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """The signed form of ``keyset`` (a JSON-ready dict), signed with the central team's key-set signing key: the
    canonical JSON text of the set (sorted keys, compact) and an Ed25519 signature over ``DOMAIN`` + its bytes."""
    text = canonical_content(keyset)
    return {"keyset": text, **sign_text(DOMAIN, text, private_key)}


class SignatureError(ValueError):
    """A central-team signature is refused: ``reason`` ``unknown_signer`` or ``bad_signature``, ``detail`` why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def sign_text(domain: bytes, text: str, private_key: Ed25519PrivateKey) -> dict[str, str]:
    """``{"signer": <16 hex key id>, "signature": <base64 Ed25519 signature over domain + UTF-8 text>}``: how the
    central team signs every document the twin carries to a box (recipient key sets, site operating points),
    each kind with its own domain-separation prefix so a signature of one kind is never valid as another."""
    sig = private_key.sign(domain + text.encode())
    return {"signer": key_id(private_key), "signature": base64.b64encode(sig).decode("ascii")}


def verify_text(domain: bytes, text: str, signer: str, signature: str, trusted: Mapping[str, str]) -> None:
    """Check a :func:`sign_text` signature against ``trusted`` (``cloud.keyset_trusted_keys``: key id -> base64
    Ed25519 public key; an entry whose id does not match its key is never used). Raises :class:`SignatureError`."""
    pub_b64 = trusted.get(signer)
    if pub_b64 is None:
        raise SignatureError("unknown_signer", f"signer {signer} is not in cloud.keyset_trusted_keys")
    try:
        pub = Ed25519PublicKey.from_public_bytes(base64.b64decode(pub_b64, validate=True))
        sig = base64.b64decode(signature, validate=True)
    except ValueError as exc:
        raise SignatureError("bad_signature", f"undecodable key or signature: {exc}") from exc
    if key_id(pub) != signer:
        raise SignatureError("unknown_signer", f"trusted key listed as {signer} has another key id")
    try:
        pub.verify(sig, domain + text.encode())
    except InvalidSignature as exc:
        raise SignatureError("bad_signature", f"signature by {signer} does not verify") from exc


def parse(doc: Any) -> tuple[SignedKeySet, KeySet]:
    """Shape check of a signed key set and of the set it holds (no signature check). Raises
    :class:`KeySetError` (``bad_format``)."""
    try:
        signed = SignedKeySet.model_validate(doc)
        return signed, signed.content()
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise KeySetError("bad_format", reasons) from exc


def verify(
    doc: Any,
    trusted: Mapping[str, str],
    *,
    at: float | None = None,
    newest: tuple[int, str] | None = None,
) -> KeySet:
    """The key set of ``doc`` once it is shown to come from the central team.

    ``trusted``: key id -> base64 Ed25519 public key (``cloud.keyset_trusted_keys``); an entry whose id does not
    match its key is never used. ``at``: the time to check expiry against (epoch s, default now). ``newest``:
    (version, canonical content) of the newest set accepted before; an older version, or the same version with
    other content, is refused. Raises :class:`KeySetError`.
    """
    signed, keyset = parse(doc)
    try:
        verify_text(DOMAIN, signed.keyset, signed.signer, signed.signature, trusted)
    except SignatureError as exc:
        raise KeySetError(exc.reason, exc.detail) from exc
    now = time.time() if at is None else at
    if keyset.expires_at <= now:
        raise KeySetError("expired", f"version {keyset.version} expired at {keyset.expires_at}")
    if newest is not None:
        version, content = newest
        if keyset.version < version:
            raise KeySetError("replayed", f"version {keyset.version} is older than {version}, in force")
        if keyset.version == version and canonical_content(keyset) != content:
            raise KeySetError("replayed", f"version {version} was accepted before with other keys")
    return keyset


def canonical_content(keyset: KeySet) -> str:
    """The canonical JSON of a key set (what the box remembers of the newest set it accepted)."""
    return json.dumps(keyset.model_dump(), sort_keys=True, separators=(",", ":"))
