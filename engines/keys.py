"""Ed25519 signing keys for model bundles, and the trust store that verifies them.

Why: the box must run only what the central team signed. A key is known by its key id (first 16 hex digits
of the sha256 of the raw public key), so several keys can be trusted at once (rotation) and any one can be
revoked by id without touching the others.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from engines.errors import BundleError, TrustError

KEY_ID = re.compile(r"^[0-9a-f]{16}\Z")  # \Z: "$" would also match before a final newline


def normalise_key_id(value: object, *, what: str = "key id") -> str:
    """The canonical form of a key id: surrounding whitespace stripped, lower-case, exactly 16 hex digits.

    Every key id the box compares (trusted keys, revoked keys, the id in a bundle's signature) goes through
    this, so ``" ABCD... "`` and ``"abcd..."`` are the same key and a revocation cannot be side-stepped by case
    or padding. Raises :class:`TrustError` ("bad_key_id") for anything else."""
    if not isinstance(value, str):
        raise TrustError("bad_key_id", f"{what} must be a string, got {type(value).__name__}")
    kid = value.strip().lower()
    if not KEY_ID.match(kid):
        raise TrustError("bad_key_id", f"{what} {value!r} is not 16 hexadecimal digits")
    return kid


def raw_public(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey | bytes) -> str:
    """Short, stable id of a public key: 16 hex digits of sha256(raw public key)."""
    raw = key if isinstance(key, bytes) else raw_public(key)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_b64(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    return base64.b64encode(raw_public(key)).decode("ascii")


def load_public_key_b64(text: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, TypeError) as exc:
        raise TrustError("bad_public_key", f"not a base64 Ed25519 public key: {exc}") from exc


def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def write_private_key(key: Ed25519PrivateKey, path: Path) -> None:
    """PEM (PKCS#8, unencrypted), created 0600 so the secret is never world-readable, even briefly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise TrustError("bad_private_key", f"{path}: not an Ed25519 private key")
    return key


def write_public_key(key: Ed25519PublicKey | Ed25519PrivateKey, path: Path) -> None:
    """One line: ``<key id> <base64 raw public key>`` (the two values that go into the config)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{key_id(key)} {public_key_b64(key)}\n", encoding="ascii")


def read_public_key_file(path: Path) -> tuple[str, str]:
    """(key id, base64) from a file written by :func:`write_public_key`; the id is recomputed and checked."""
    parts = Path(path).read_text(encoding="ascii").split()
    b64 = parts[-1]
    kid = key_id(load_public_key_b64(b64))
    if len(parts) == 2 and normalise_key_id(parts[0]) != kid:
        raise TrustError("key_id_mismatch", f"{path}: key id {parts[0]} does not match its key ({kid})")
    return kid, b64


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    return key.sign(data)


@dataclass
class TrustStore:
    """Trusted public keys by key id, plus revoked key ids (a revoked key is refused even if trusted).

    Key ids are held in their canonical form (:func:`normalise_key_id`); build it with :meth:`from_config`."""

    keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)
    revoked: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.keys = {normalise_key_id(k, what="trusted key id"): v for k, v in self.keys.items()}
        self.revoked = {normalise_key_id(k, what="revoked key id") for k in self.revoked}
        for kid, pub in self.keys.items():
            if key_id(pub) != kid:
                raise TrustError("key_id_mismatch", f"trusted key {kid!r} is really {key_id(pub)!r}")

    @classmethod
    def from_config(cls, trusted: Mapping[str, str], revoked: Iterable[str] = ()) -> TrustStore:
        """Build from ``{key id: base64 public key}`` and revoked key ids. Every id is normalised
        (:func:`normalise_key_id`); a malformed id (``bad_key_id``), the same key twice under two spellings
        (``duplicate_key_id``) or an id that does not match its key (``key_id_mismatch``) raises TrustError."""
        keys: dict[str, Ed25519PublicKey] = {}
        for raw_kid, b64 in trusted.items():
            kid = normalise_key_id(raw_kid, what="trusted key id")
            if kid in keys:
                raise TrustError("duplicate_key_id", f"trusted key {kid} is listed twice")
            pub = load_public_key_b64(b64)
            if key_id(pub) != kid:
                raise TrustError("key_id_mismatch", f"trusted key {kid!r} is really {key_id(pub)!r}")
            keys[kid] = pub
        return cls(keys, {normalise_key_id(r, what="revoked key id") for r in revoked})

    def verify(self, kid: str, signature: bytes, data: bytes, *, bundle: str | None = None) -> str:
        """Check ``signature`` over ``data`` by key ``kid`` (normalised first); returns the normalised id.

        Raises :class:`BundleError`: bad_signature_file (malformed id), revoked_key, unknown_key, bad_signature.
        Revocation is checked first, on the normalised id, so no spelling of a revoked id gets through."""
        try:
            kid = normalise_key_id(kid, what="signature key id")
        except TrustError as exc:
            raise BundleError("bad_signature_file", str(exc), bundle=bundle) from exc
        if kid in self.revoked:
            raise BundleError("revoked_key", f"signed with revoked key {kid}", bundle=bundle)
        pub = self.keys.get(kid)
        if pub is None:
            raise BundleError("unknown_key", f"signed with unknown key {kid}", bundle=bundle)
        try:
            pub.verify(signature, data)
        except InvalidSignature as exc:
            raise BundleError("bad_signature", f"signature by {kid} does not verify", bundle=bundle) from exc
        return kid
