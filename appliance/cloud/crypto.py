"""Envelope encryption for the central team: only holders of a recipient private key can read a payload.

Per message: a random 256-bit content key encrypts the body with AES-256-GCM; the message metadata
(canonical JSON) is the associated data, so it cannot be altered without detection. For each recipient
key (several allow key rotation), an ephemeral X25519 key agreement + HKDF-SHA256 derives a key-wrapping
key that AES-256-GCM-wraps the content key. The envelope is JSON with base64 fields.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

ALG = "X25519-HKDF-SHA256-A256GCM"
VERSION = 1
_INFO = b"clinic-appliance envelope v1 kek"


class DecryptError(Exception):
    """The envelope cannot be opened with the given keys (wrong key, tampered, or not an envelope)."""


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s, validate=True)


def canonical(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def load_public_key(b64: str) -> X25519PublicKey:
    raw = _unb64(b64)
    if len(raw) != 32:
        raise ValueError("an X25519 public key is 32 bytes")
    return X25519PublicKey.from_public_bytes(raw)


def load_private_key(b64: str) -> X25519PrivateKey:
    raw = _unb64(b64)
    if len(raw) != 32:
        raise ValueError("an X25519 private key is 32 bytes")
    return X25519PrivateKey.from_private_bytes(raw)


def generate_keypair() -> tuple[str, str]:
    """(private b64, public b64) raw X25519 keys."""
    priv = X25519PrivateKey.generate()
    raw_priv = priv.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    raw_pub = priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _b64(raw_priv), _b64(raw_pub)


def _kek(shared: bytes, epk: bytes, rpk: bytes, kid: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=epk + rpk, info=_INFO + b" " + kid.encode()).derive(shared)


def encrypt(plaintext: bytes, meta: dict[str, Any], recipients: dict[str, str]) -> bytes:
    """Seal ``plaintext`` for every recipient (key id -> X25519 public key b64); ``meta`` is authenticated."""
    if not recipients:
        raise ValueError("no recipient keys configured: refusing to produce an unencrypted payload")
    aad = canonical(meta)
    cek = AESGCM.generate_key(bit_length=256)
    nonce = os.urandom(12)
    ct = AESGCM(cek).encrypt(nonce, plaintext, aad)
    wrapped = []
    for kid, pub_b64 in sorted(recipients.items()):
        rpk = load_public_key(pub_b64)
        rpk_raw = rpk.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        eph = X25519PrivateKey.generate()
        epk_raw = eph.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        kek = _kek(eph.exchange(rpk), epk_raw, rpk_raw, kid)
        wnonce = os.urandom(12)
        wrapped.append(
            {"kid": kid, "epk": _b64(epk_raw), "nonce": _b64(wnonce), "wk": _b64(AESGCM(kek).encrypt(wnonce, cek, aad))}
        )
    env = {"v": VERSION, "alg": ALG, "meta": meta, "recipients": wrapped, "nonce": _b64(nonce), "ct": _b64(ct)}
    return json.dumps(env, separators=(",", ":")).encode()


def decrypt(envelope: bytes, private_keys: dict[str, str]) -> tuple[dict[str, Any], bytes]:
    """Open an envelope with any matching private key (key id -> X25519 private key b64): (meta, plaintext)."""
    try:
        env = json.loads(envelope)
        if env.get("v") != VERSION or env.get("alg") != ALG:
            raise DecryptError(f"unsupported envelope version/algorithm: {env.get('v')!r}/{env.get('alg')!r}")
        meta = env["meta"]
        aad = canonical(meta)
        nonce, ct = _unb64(env["nonce"]), _unb64(env["ct"])
        kids = [r["kid"] for r in env["recipients"]]
    except DecryptError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise DecryptError(f"not an envelope: {exc}") from exc
    for r in env["recipients"]:
        priv_b64 = private_keys.get(r["kid"])
        if priv_b64 is None:
            continue
        priv = load_private_key(priv_b64)
        rpk_raw = priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        epk_raw = _unb64(r["epk"])
        kek = _kek(priv.exchange(X25519PublicKey.from_public_bytes(epk_raw)), epk_raw, rpk_raw, r["kid"])
        try:
            cek = AESGCM(kek).decrypt(_unb64(r["nonce"]), _unb64(r["wk"]), aad)
            return meta, AESGCM(cek).decrypt(nonce, ct, aad)
        except InvalidTag as exc:
            raise DecryptError(f"authentication failed for key {r['kid']!r}: tampered or wrong key") from exc
    raise DecryptError(f"no private key for any recipient of this envelope (recipients: {kids})")
