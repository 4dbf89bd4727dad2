"""Model bundle files: build, sign, verify and unpack.

A bundle is one gzip'd tar holding ``manifest.json`` (canonical JSON, see :func:`engines.manifest.canonical_bytes`),
``signature`` (JSON: algorithm, key id, base64 Ed25519 signature over the exact manifest bytes),
``model.onnx``, ``golden.npz`` and optional ``assets/...``. The manifest pins every other file's sha256,
so the one signature covers the whole bundle. Unpacking streams each member to disk while hashing it and
refuses, with a specific :class:`BundleError` reason, anything that is not exactly what was signed.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from durable import replace_durably
from engines.errors import BundleError
from engines.keys import TrustStore, key_id, sign
from engines.manifest import Manifest, canonical_bytes, version_key

MANIFEST = "manifest.json"
SIGNATURE = "signature"
SIG_ALG = "Ed25519"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Upper bounds applied while reading a bundle, before trusting anything in it."""

    max_member_bytes: int = 2 * 1024**3
    max_total_bytes: int = 4 * 1024**3
    max_members: int = 256
    max_manifest_bytes: int = 1024**2
    max_signature_bytes: int = 16 * 1024


@dataclass(frozen=True)
class Verified:
    """What verification established about a bundle."""

    manifest: Manifest
    key_id: str
    digest: str  # sha256 of the signed manifest bytes: identifies the bundle's exact content


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def manifest_digest(manifest_bytes: bytes) -> str:
    return hashlib.sha256(manifest_bytes).hexdigest()


def _utcnow() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


# --------------------------------------------------------------------------------------------------
# Build and sign (central team)


def build_bundle(out: Path, manifest: Mapping[str, Any], files: Mapping[str, Path]) -> Manifest:
    """Write an unsigned bundle: ``manifest`` (without ``files``) plus ``files`` {name in bundle: path}.

    ``files`` must include ``model.onnx`` and ``golden.npz``; the sha256 of each is put in the manifest
    and ``created`` is set to now when absent.
    """
    for name in files:
        _check_name(name, None)
        if name in (MANIFEST, SIGNATURE):
            raise BundleError("bad_manifest", f"{name!r} is reserved")
    doc = dict(manifest)
    doc["files"] = {name: sha256_file(Path(p)) for name, p in sorted(files.items())}
    doc.setdefault("created", _utcnow())
    try:
        m = Manifest.model_validate(doc)
    except ValidationError as exc:
        raise BundleError("bad_manifest", f"invalid manifest: {exc}", bundle=doc.get("bundle_id")) from exc
    members: list[tuple[str, bytes | Path]] = [(MANIFEST, canonical_bytes(m))]
    members += [(name, Path(files[name])) for name in sorted(files)]
    _write_tar(out, members)
    return m


def sign_bundle(path: Path, private_key, out: Path | None = None) -> str:
    """Add (or replace) the bundle's signature; returns the signing key id. Writes atomically."""
    with tempfile.TemporaryDirectory(prefix="bundle-sign-") as tmp:
        names = _extract_all(Path(path), Path(tmp), Limits())
        manifest_bytes = (Path(tmp) / MANIFEST).read_bytes() if MANIFEST in names else None
        if manifest_bytes is None:
            raise BundleError("missing_file", "bundle has no manifest.json")
        m = _parse_manifest(manifest_bytes, None)
        kid = key_id(private_key)
        sig = {"alg": SIG_ALG, "key_id": kid, "sig": base64.b64encode(sign(private_key, manifest_bytes)).decode()}
        members: list[tuple[str, bytes | Path]] = [
            (MANIFEST, manifest_bytes),
            (SIGNATURE, json.dumps(sig, sort_keys=True).encode()),
        ]
        members += [(n, Path(tmp) / n) for n in names if n not in (MANIFEST, SIGNATURE)]
        _write_tar(Path(out or path), members)
    del m
    return kid


def _write_tar(out: Path, members: list[tuple[str, bytes | Path]]) -> None:
    """Deterministic tar.gz (fixed mtimes/owners), written to a temp file then renamed into place."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".bundle-", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as raw:
            import gzip

            with (
                gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz,
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
            ):
                for name, src in members:
                    info = tarfile.TarInfo(name)
                    info.mode, info.mtime, info.uid, info.gid = 0o644, 0, 0, 0
                    info.uname = info.gname = ""
                    if isinstance(src, bytes):
                        info.size = len(src)
                        tar.addfile(info, io.BytesIO(src))
                    else:
                        info.size = Path(src).stat().st_size
                        with open(src, "rb") as fh:
                            tar.addfile(info, fh)
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o644)  # a bundle is signed, not secret
        replace_durably(Path(tmp), out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------------
# Verify and unpack (the box)


def _check_name(name: str, bundle: str | None) -> None:
    if not _NAME.match(name) or any(part in (".", "..") for part in name.split("/")):
        raise BundleError("path_traversal", f"unsafe member name {name!r}", bundle=bundle)


def _extract_all(path: Path, dest: Path, limits: Limits, bundle: str | None = None) -> list[str]:
    """Stream every member into ``dest`` after checking name, type and size; return the names in order."""
    try:
        tar = tarfile.open(path, mode="r:*")  # noqa: SIM115 - closed by the with below
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError("not_a_bundle", f"{path.name}: not a readable bundle archive ({exc})", bundle=bundle) from exc
    names: list[str] = []
    total = 0
    try:
        with tar:
            while True:
                try:
                    info = tar.next()
                except (tarfile.TarError, OSError, EOFError) as exc:
                    raise BundleError("not_a_bundle", f"corrupt archive: {exc}", bundle=bundle) from exc
                if info is None:
                    break
                name = info.name
                _check_name(name, bundle)
                if info.issym() or info.islnk():
                    raise BundleError("link_member", f"{name!r} is a link", bundle=bundle)
                if not info.isfile():
                    raise BundleError("bad_member_type", f"{name!r} is not a regular file", bundle=bundle)
                if name in names:
                    raise BundleError("duplicate_member", f"{name!r} appears twice", bundle=bundle)
                if len(names) >= limits.max_members:
                    raise BundleError("too_many_members", f"more than {limits.max_members} members", bundle=bundle)
                cap = {MANIFEST: limits.max_manifest_bytes, SIGNATURE: limits.max_signature_bytes}.get(
                    name, limits.max_member_bytes
                )
                if info.size > cap:
                    raise BundleError("oversized_member", f"{name!r} is {info.size} bytes (limit {cap})", bundle=bundle)
                total += info.size
                if total > limits.max_total_bytes:
                    raise BundleError(
                        "oversized_bundle", f"bundle exceeds {limits.max_total_bytes} bytes", bundle=bundle
                    )
                target = dest / name
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(info)
                if src is None:  # pragma: no cover - isfile() members always have data
                    raise BundleError("bad_member_type", f"{name!r} has no data", bundle=bundle)
                written = 0
                try:
                    with open(target, "xb") as out:
                        while chunk := src.read(_CHUNK):
                            written += len(chunk)
                            if written > info.size:  # cannot happen with tarfile, but never trust it
                                raise BundleError("oversized_member", f"{name!r} longer than declared", bundle=bundle)
                            out.write(chunk)
                except (tarfile.TarError, OSError, EOFError) as exc:
                    if isinstance(exc, FileExistsError):
                        raise BundleError("duplicate_member", f"{name!r} collides", bundle=bundle) from exc
                    raise BundleError("not_a_bundle", f"corrupt archive at {name!r}: {exc}", bundle=bundle) from exc
                if written != info.size:
                    raise BundleError("not_a_bundle", f"{name!r} is truncated", bundle=bundle)
                names.append(name)
    except (tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, BundleError):
            raise
        raise BundleError("not_a_bundle", f"corrupt archive: {exc}", bundle=bundle) from exc
    return names


def _parse_manifest(raw: bytes, bundle: str | None) -> Manifest:
    try:
        m = Manifest.model_validate_json(raw)
    except ValidationError as exc:
        raise BundleError("bad_manifest", f"invalid manifest: {exc.errors()[0]['msg']}", bundle=bundle) from exc
    if canonical_bytes(m) != raw:
        raise BundleError("noncanonical_manifest", "manifest.json is not in canonical form", bundle=m.bundle_id)
    return m


def verify_dir(
    root: Path, trust: TrustStore | None, *, appliance_version: str | None = None, allow_extra: tuple[str, ...] = ()
) -> Verified:
    """Verify an unpacked bundle directory: signature (when ``trust`` is given), every hash, no extra file."""
    root = Path(root)
    mpath, spath = root / MANIFEST, root / SIGNATURE
    if not mpath.is_file():
        raise BundleError("missing_file", "manifest.json missing")
    raw = mpath.read_bytes()
    hint = _bundle_hint(raw)
    if not spath.is_file():
        raise BundleError("unsigned", "bundle is not signed (no signature file)", bundle=hint)
    try:
        sig = json.loads(spath.read_bytes())
        kid, alg = str(sig["key_id"]), sig["alg"]
        signature = base64.b64decode(sig["sig"], validate=True)
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError("bad_signature_file", f"signature file unreadable: {exc}", bundle=hint) from exc
    if alg != SIG_ALG:
        raise BundleError("bad_signature_file", f"unsupported signature algorithm {alg!r}", bundle=hint)
    if trust is not None:
        trust.verify(kid, signature, raw, bundle=hint)
    m = _parse_manifest(raw, hint)
    bid = f"{m.bundle_id}@{m.version}"
    present = {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if (p.is_file() or p.is_symlink()) and p.name not in allow_extra
    }
    for p in root.rglob("*"):
        if p.is_symlink():
            raise BundleError("link_member", f"{p.relative_to(root)} is a link", bundle=bid)
    for name, digest in sorted(m.files.items()):
        f = root / name
        if not f.is_file():
            raise BundleError("missing_file", f"{name} is listed in the manifest but missing", bundle=bid)
        if sha256_file(f) != digest:
            raise BundleError("hash_mismatch", f"{name} does not match its sha256 in the manifest", bundle=bid)
    extra = sorted(present - set(m.files) - {MANIFEST, SIGNATURE})
    if extra:
        raise BundleError("unlisted_file", f"files not listed in the manifest: {extra}", bundle=bid)
    if appliance_version and version_key(appliance_version) < version_key(m.min_appliance_version):
        raise BundleError(
            "appliance_too_old",
            f"needs appliance >= {m.min_appliance_version}, this is {appliance_version}",
            bundle=bid,
        )
    return Verified(m, kid, manifest_digest(raw))


def _bundle_hint(raw: bytes) -> str | None:
    """Best-effort 'id@version' for error messages, from not-yet-trusted bytes."""
    try:
        doc = json.loads(raw)
        return f"{doc['bundle_id']}@{doc['version']}"[:80]
    except (ValueError, KeyError, TypeError):
        return None


def unpack_bundle(
    path: Path,
    dest: Path,
    trust: TrustStore,
    *,
    limits: Limits = Limits(),
    appliance_version: str | None = None,
) -> Verified:
    """Verify ``path`` and unpack it to ``dest`` (which must not exist). On any failure nothing is left."""
    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.unpack-", dir=dest.parent))
    try:
        _extract_all(Path(path), tmp, limits)
        verified = verify_dir(tmp, trust, appliance_version=appliance_version)
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        replace_durably(tmp, dest)
        return verified
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def verify_bundle(
    path: Path, trust: TrustStore, *, limits: Limits = Limits(), appliance_version: str | None = None
) -> Verified:
    """Full verification of a bundle file without installing it."""
    with tempfile.TemporaryDirectory(prefix="bundle-verify-") as tmp:
        return unpack_bundle(Path(path), Path(tmp) / "b", trust, limits=limits, appliance_version=appliance_version)


def read_manifest_unverified(path: Path) -> Manifest:
    """The manifest of a bundle file WITHOUT checking its signature (for display in tooling only)."""
    with tempfile.TemporaryDirectory(prefix="bundle-peek-") as tmp:
        names = _extract_all(Path(path), Path(tmp), Limits())
        if MANIFEST not in names:
            raise BundleError("missing_file", "bundle has no manifest.json")
        return _parse_manifest((Path(tmp) / MANIFEST).read_bytes(), None)


def is_newer(a: str, b: str) -> bool:
    return version_key(a) > version_key(b)
