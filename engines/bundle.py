"""Model bundle files: build, sign, verify and unpack.

A bundle is one gzip'd tar holding ``manifest.json`` (canonical JSON, see :func:`engines.manifest.canonical_bytes`),
``signature`` (JSON: algorithm, key id, base64 Ed25519 signature over the exact manifest bytes),
``model.onnx``, ``golden.npz`` and optional ``assets/...`` (e.g. ONNX external data). The manifest pins every
other file's sha256 and size, so the one signature covers the whole bundle.

Verification order (the box, :func:`unpack_bundle`): the first two members must be ``manifest.json`` and
``signature`` (read into memory, size-bounded); the signature is checked and the manifest parsed (expiry, key
revocation, strict JSON) BEFORE any other member is read. Each further member must be listed in the manifest,
appear once, be a regular file of exactly the signed size; it is hashed while it streams to disk and refused on
the first wrong byte count or digest. The decompressed stream as a whole is bounded by what the signed manifest
declares, so an unsigned archive can make the box write nothing and decompress at most ~1 MiB.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from durable import replace_durably
from engines.errors import BundleError
from engines.keys import TrustStore, key_id, sign
from engines.manifest import (
    MAX_FILE_BYTES,
    MEMBER_NAME,
    Manifest,
    canonical_bytes,
    check_json_values,
    loads_strict,
    parse_manifest_bytes,
    parse_utc,
    version_key,
)

MANIFEST = "manifest.json"
SIGNATURE = "signature"
SIG_ALG = "Ed25519"
_NAME = MEMBER_NAME  # one rule for tar members and manifest paths (\Z: "$" would also match before a final newline)
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Upper bounds applied while reading a bundle (bytes, counts). The manifest and signature are bounded
    before they are authenticated; every other member by its signed size, and all of them by the totals."""

    max_member_bytes: int = MAX_FILE_BYTES
    max_total_bytes: int = 4 * 1024**3
    max_members: int = 256
    max_manifest_bytes: int = 1024**2
    max_signature_bytes: int = 16 * 1024
    # tar headers (512-byte blocks, PAX records) around each member, allowed on top of the members' own sizes
    header_allowance_bytes: int = 64 * 1024


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


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _utcnow() -> str:
    return _iso(dt.datetime.now(dt.timezone.utc))


# --------------------------------------------------------------------------------------------------
# Build and sign (central team)


def build_bundle(
    out: Path, manifest: Mapping[str, Any], files: Mapping[str, Path], *, valid_days: int = 365
) -> Manifest:
    """Write an UNSIGNED bundle (central team tooling): ``manifest`` (without ``files``/``file_sizes``) plus
    ``files`` {name in bundle: path}.

    ``files`` must include ``model.onnx`` and ``golden.npz``; the sha256 and size of each are put in the
    manifest, ``created`` is set to now when absent and ``expires`` to ``created`` + ``valid_days`` days when
    absent. Raises BundleError (bad_manifest, path_traversal, external_data).
    """
    for name in files:
        _check_name(name, None)
        if name in (MANIFEST, SIGNATURE):
            raise BundleError("bad_manifest", f"{name!r} is reserved")
    doc = dict(manifest)
    doc["files"] = {name: sha256_file(Path(p)) for name, p in sorted(files.items())}
    doc["file_sizes"] = {name: Path(p).stat().st_size for name, p in sorted(files.items())}
    doc.setdefault("created", _utcnow())
    if "expires" not in doc:
        try:
            created = parse_utc(doc["created"])
        except (ValueError, TypeError) as exc:
            raise BundleError("bad_manifest", f"invalid created: {exc}", bundle=doc.get("bundle_id")) from exc
        doc["expires"] = _iso(created + dt.timedelta(days=valid_days))
    try:
        m = Manifest.model_validate(doc)
    except ValidationError as exc:
        raise BundleError("bad_manifest", f"invalid manifest: {exc}", bundle=doc.get("bundle_id")) from exc
    if "model.onnx" in files:  # caught here rather than on the box; an unparseable model the box refuses itself
        try:
            check_external_data(Path(files["model.onnx"]), m, bundle=f"{m.bundle_id}@{m.version}")
        except BundleError as exc:
            if exc.reason != "bad_model":
                raise
    members: list[tuple[str, bytes | Path]] = [(MANIFEST, canonical_bytes(m))]
    members += [(name, Path(files[name])) for name in sorted(files)]
    _write_tar(out, members)
    return m


def sign_bundle(path: Path, private_key, out: Path | None = None) -> str:
    """Add (or replace) the bundle's signature (central team tooling: the bundle is the signer's own, not
    verified); returns the signing key id. Writes atomically."""
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
# Reading archives: a byte budget on the decompressed stream


class _BoundedReader(io.RawIOBase):
    """A read-only stream over the DECOMPRESSED archive that raises ``oversized_bundle`` once more than
    ``budget`` bytes were read. The budget starts small (what an unauthenticated head may take) and is raised
    to what the signed manifest declares once it verified, so no archive, however well it compresses, makes
    the box decompress more than the signer allowed."""

    def __init__(self, inner: Any, budget: int, bundle: str | None = None):
        self._inner = inner
        self.budget = budget
        self.consumed = 0
        self.bundle = bundle

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self.consumed >= self.budget:
            probe = self._inner.read(1)
            if not probe:
                return 0
            raise BundleError(
                "oversized_bundle", f"archive decompresses to more than {self.budget} bytes", bundle=self.bundle
            )
        view = memoryview(b)
        want = min(len(view), self.budget - self.consumed)
        data = self._inner.read(want)
        n = len(data)
        view[:n] = data
        self.consumed += n
        return n


@contextlib.contextmanager
def _open_stream(path: Path, budget: int, bundle: str | None) -> Iterator[tuple[tarfile.TarFile, _BoundedReader]]:
    """The archive as a forward-only tar stream (gzip'd or plain) behind a :class:`_BoundedReader`."""
    try:
        raw = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise BundleError("not_a_bundle", f"{Path(path).name}: cannot open ({exc})", bundle=bundle) from exc
    try:
        gz = raw.peek(2)[:2] == b"\x1f\x8b" if hasattr(raw, "peek") else False
        inner: Any = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
        bounded = _BoundedReader(inner, budget, bundle)
        try:
            tar = tarfile.open(fileobj=io.BufferedReader(bounded, 64 * 1024), mode="r|")  # noqa: SIM115
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            name = Path(path).name
            raise BundleError("not_a_bundle", f"{name}: not a readable bundle archive ({exc})", bundle=bundle) from exc
        with tar:
            yield tar, bounded
    finally:
        raw.close()


def _next(tar: tarfile.TarFile, bundle: str | None) -> tarfile.TarInfo | None:
    try:
        return tar.next()
    except BundleError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise BundleError("not_a_bundle", f"corrupt archive: {exc}", bundle=bundle) from exc


def _check_member(info: tarfile.TarInfo, bundle: str | None) -> None:
    _check_name(info.name, bundle)
    if info.issym() or info.islnk():
        raise BundleError("link_member", f"{info.name!r} is a link", bundle=bundle)
    if not info.isfile():
        raise BundleError("bad_member_type", f"{info.name!r} is not a regular file", bundle=bundle)
    if info.issparse():  # a sparse member expands to its declared size from a few bytes: never legitimate here
        raise BundleError("bad_member_type", f"{info.name!r} is a sparse file", bundle=bundle)


def _read_small(tar: tarfile.TarFile, info: tarfile.TarInfo, cap: int, bundle: str | None) -> bytes:
    if info.size > cap:
        raise BundleError("oversized_member", f"{info.name!r} is {info.size} bytes (limit {cap})", bundle=bundle)
    src = tar.extractfile(info)
    try:
        data = src.read(cap + 1) if src is not None else b""
    except BundleError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise BundleError("not_a_bundle", f"corrupt archive at {info.name!r}: {exc}", bundle=bundle) from exc
    if len(data) != info.size:
        raise BundleError("not_a_bundle", f"{info.name!r} is truncated", bundle=bundle)
    return data


def _check_name(name: str, bundle: str | None) -> None:
    if not _NAME.match(name) or any(part in (".", "..") for part in name.split("/")):
        raise BundleError("path_traversal", f"unsafe member name {name!r}", bundle=bundle)


# --------------------------------------------------------------------------------------------------
# Verify and unpack (the box)


def _bundle_hint(raw: bytes) -> str | None:
    """Best-effort 'id@version' for error messages, from not-yet-trusted bytes; None when there is none, or
    when it could not be printed (text that does not encode as UTF-8)."""
    try:
        doc = json.loads(raw)
        hint = f"{doc['bundle_id']}@{doc['version']}"[:80]
        check_json_values(hint)
        return hint
    except (ValueError, KeyError, TypeError, RecursionError):
        return None


def _parse_manifest(raw: bytes, bundle: str | None) -> Manifest:
    try:
        m = parse_manifest_bytes(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise BundleError("bad_manifest", f"invalid manifest: {where}: {err['msg']}", bundle=bundle) from exc
    except (ValueError, TypeError) as exc:
        raise BundleError("bad_manifest", f"invalid manifest: {exc}", bundle=bundle) from exc
    if canonical_bytes(m) != raw:
        raise BundleError("noncanonical_manifest", "manifest.json is not in canonical form", bundle=m.bundle_id)
    return m


def _authenticate(
    manifest_bytes: bytes, signature_bytes: bytes, trust: TrustStore, appliance_version: str | None
) -> tuple[Manifest, str]:
    """Signature, then manifest, expiry and appliance version: (manifest, normalised key id) or BundleError."""
    if not isinstance(trust, TrustStore):
        raise TypeError(f"trust must be a TrustStore, not {type(trust).__name__}: signatures are never skipped")
    hint = _bundle_hint(manifest_bytes)
    try:
        sig = loads_strict(signature_bytes)
        kid, alg = sig["key_id"], sig["alg"]
        signature = base64.b64decode(sig["sig"], validate=True)
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError("bad_signature_file", f"signature file unreadable: {exc}", bundle=hint) from exc
    if alg != SIG_ALG:
        raise BundleError("bad_signature_file", f"unsupported signature algorithm {alg!r}", bundle=hint)
    kid = trust.verify(kid, signature, manifest_bytes, bundle=hint)
    m = _parse_manifest(manifest_bytes, hint)
    bid = f"{m.bundle_id}@{m.version}"
    if m.expired():
        raise BundleError(
            "expired", f"the bundle expired at {m.expires}; the central team must re-issue it", bundle=bid
        )
    if appliance_version and version_key(appliance_version) < version_key(m.min_appliance_version):
        raise BundleError(
            "appliance_too_old",
            f"needs appliance >= {m.min_appliance_version}, this is {appliance_version}",
            bundle=bid,
        )
    return m, kid


def check_external_data(model_path: Path, manifest: Manifest, *, bundle: str | None = None) -> list[str]:
    """Refuse a model whose tensors reference external data outside the bundle.

    Parses ``model_path`` without loading external data (``onnx.load(..., load_external_data=False)``), walks
    every tensor (initializers, node attributes, subgraphs) stored externally and requires its ``location`` to
    be a relative path without ``.``/``..`` parts or backslashes that names a file listed in the manifest (other
    than the manifest, signature and the model itself). This does not rely on ONNX Runtime's own check (which
    old versions lack). Returns the locations used; raises BundleError("external_data") or ("bad_model")."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends: not a model
        raise BundleError("bad_model", f"{Path(model_path).name} is not an ONNX model: {exc}", bundle=bundle) from exc
    allowed = set(manifest.files) - {MANIFEST, SIGNATURE, "model.onnx", "golden.npz"}
    used: list[str] = []
    sparse = [t for sp in model.graph.sparse_initializer for t in (sp.values, sp.indices)]
    for tensor in [*_get_all_tensors(model), *sparse]:  # onnx's own walk: initializers, attributes, subgraphs
        if not uses_external_data(tensor):
            continue
        locations = [e.value for e in tensor.external_data if e.key == "location"]
        if len(locations) != 1:
            raise BundleError("external_data", f"tensor {tensor.name!r}: needs exactly one location", bundle=bundle)
        location = ExternalDataInfo(tensor).location
        parts = location.split("/")
        if (
            not location
            or location.startswith("/")
            or "\\" in location
            or any(p in ("", ".", "..") for p in parts)
            or location not in allowed
        ):
            raise BundleError(
                "external_data",
                f"tensor {tensor.name!r} reads external data {location!r}, which is not a file of this bundle",
                bundle=bundle,
            )
        used.append(location)
    return sorted(set(used))


def _stream_members(
    tar: tarfile.TarFile,
    bounded: _BoundedReader,
    m: Manifest,
    dest: Path,
    limits: Limits,
    bundle: str,
) -> None:
    """Stream every member after the manifest and signature to ``dest``, hashing against the manifest."""
    total = sum(m.file_sizes.values())
    if total > limits.max_total_bytes:
        raise BundleError(
            "oversized_bundle", f"manifest declares {total} bytes (limit {limits.max_total_bytes})", bundle=bundle
        )
    if len(m.files) + 2 > limits.max_members:
        raise BundleError("too_many_members", f"more than {limits.max_members} members", bundle=bundle)
    too_big = sorted(n for n, size in m.file_sizes.items() if size > limits.max_member_bytes)
    if too_big:
        raise BundleError("oversized_member", f"{too_big} larger than {limits.max_member_bytes} bytes", bundle=bundle)
    # from here on the archive may decompress to what the SIGNED manifest declares, plus tar headers
    bounded.budget = bounded.consumed + total + limits.header_allowance_bytes * (len(m.files) + 1)
    seen: set[str] = set()
    while (info := _next(tar, bundle)) is not None:
        name = info.name
        _check_member(info, bundle)
        if name in seen or name in (MANIFEST, SIGNATURE):
            raise BundleError("duplicate_member", f"{name!r} appears twice", bundle=bundle)
        if name not in m.files:
            raise BundleError("unlisted_file", f"{name!r} is not listed in the manifest", bundle=bundle)
        if info.size != m.file_sizes[name]:
            raise BundleError(
                "hash_mismatch", f"{name} is {info.size} bytes, the manifest says {m.file_sizes[name]}", bundle=bundle
            )
        seen.add(name)
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        src = tar.extractfile(info)
        h = hashlib.sha256()
        written = 0
        try:
            with open(target, "xb") as out:
                while src is not None and (chunk := src.read(min(_CHUNK, info.size - written + 1))):
                    written += len(chunk)
                    if written > info.size:
                        raise BundleError("hash_mismatch", f"{name} longer than signed", bundle=bundle)
                    h.update(chunk)
                    out.write(chunk)
        except BundleError:
            raise
        except FileExistsError as exc:
            raise BundleError("duplicate_member", f"{name!r} collides", bundle=bundle) from exc
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise BundleError("not_a_bundle", f"corrupt archive at {name!r}: {exc}", bundle=bundle) from exc
        if written != info.size:
            raise BundleError("not_a_bundle", f"{name!r} is truncated", bundle=bundle)
        if h.hexdigest() != m.files[name]:
            raise BundleError("hash_mismatch", f"{name} does not match its sha256 in the manifest", bundle=bundle)
    missing = sorted(set(m.files) - seen)
    if missing:
        raise BundleError("missing_file", f"listed in the manifest but missing: {missing}", bundle=bundle)


def _read_head(tar: tarfile.TarFile, limits: Limits, bundle: str | None) -> tuple[bytes, bytes | None]:
    """(manifest bytes, signature bytes or None): the first one or two members, read into memory, bounded."""
    head: dict[str, bytes] = {}
    caps = {MANIFEST: limits.max_manifest_bytes, SIGNATURE: limits.max_signature_bytes}
    for _ in range(2):
        info = _next(tar, bundle)
        if info is None:
            break
        if info.name not in caps or info.name in head:
            if MANIFEST not in head:
                raise BundleError("missing_file", "manifest.json must be the first member", bundle=bundle)
            raise BundleError("unsigned", "bundle is not signed (no signature after the manifest)", bundle=bundle)
        _check_member(info, bundle)
        head[info.name] = _read_small(tar, info, caps[info.name], bundle)
    if MANIFEST not in head:
        raise BundleError("missing_file", "bundle has no manifest.json", bundle=bundle)
    return head[MANIFEST], head.get(SIGNATURE)


def unpack_bundle(
    path: Path,
    dest: Path,
    trust: TrustStore,
    *,
    limits: Limits = Limits(),
    appliance_version: str | None = None,
) -> Verified:
    """Verify ``path`` in the safe order (module docstring) and unpack it to ``dest`` (which must not exist).

    ``trust`` is required: there is no way to skip the signature (``None`` raises TypeError). Nothing but the
    manifest and signature (in memory) is read before the signature verified; on any failure nothing is left.
    Raises BundleError with a reason (unsigned, unknown_key, revoked_key, bad_signature, expired, hash_mismatch,
    unlisted_file, oversized_bundle, external_data, ...)."""
    if not isinstance(trust, TrustStore):
        raise TypeError(f"trust must be a TrustStore, not {type(trust).__name__}: signatures are never skipped")
    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.unpack-", dir=dest.parent))
    head_budget = limits.max_manifest_bytes + limits.max_signature_bytes + 2 * limits.header_allowance_bytes
    try:
        with _open_stream(Path(path), head_budget, None) as (tar, bounded):
            manifest_bytes, signature_bytes = _read_head(tar, limits, None)
            hint = _bundle_hint(manifest_bytes)
            if signature_bytes is None:
                raise BundleError("unsigned", "bundle is not signed (no signature file)", bundle=hint)
            m, kid = _authenticate(manifest_bytes, signature_bytes, trust, appliance_version)
            bid = f"{m.bundle_id}@{m.version}"
            bounded.bundle = bid
            _stream_members(tar, bounded, m, tmp, limits, bid)
        (tmp / MANIFEST).write_bytes(manifest_bytes)
        (tmp / SIGNATURE).write_bytes(signature_bytes)
        check_external_data(tmp / "model.onnx", m, bundle=bid)
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        replace_durably(tmp, dest)
        return Verified(m, kid, manifest_digest(manifest_bytes))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def verify_bundle(
    path: Path, trust: TrustStore, *, limits: Limits = Limits(), appliance_version: str | None = None
) -> Verified:
    """Full verification of a bundle file without installing it (unpacked to a temporary directory that is
    removed; what is written there is bounded by the signed sizes). Same errors as :func:`unpack_bundle`."""
    if not isinstance(trust, TrustStore):
        raise TypeError(f"trust must be a TrustStore, not {type(trust).__name__}: signatures are never skipped")
    with tempfile.TemporaryDirectory(prefix="bundle-verify-") as tmp:
        return unpack_bundle(Path(path), Path(tmp) / "b", trust, limits=limits, appliance_version=appliance_version)


def verify_dir(
    root: Path,
    trust: TrustStore,
    *,
    appliance_version: str | None = None,
    limits: Limits = Limits(),
) -> Verified:
    """Re-verify an unpacked (installed) bundle directory with the CURRENT trust store: signature, expiry,
    every size and hash, no file that is not listed, no link, external data inside the bundle.

    ``trust`` is required (``None`` raises TypeError). Raises BundleError with a reason."""
    if not isinstance(trust, TrustStore):
        raise TypeError(f"trust must be a TrustStore, not {type(trust).__name__}: signatures are never skipped")
    root = Path(root)
    mpath, spath = root / MANIFEST, root / SIGNATURE
    if not mpath.is_file() or mpath.is_symlink():
        raise BundleError("missing_file", "manifest.json missing")
    if mpath.stat().st_size > limits.max_manifest_bytes:
        raise BundleError("oversized_member", f"manifest.json larger than {limits.max_manifest_bytes} bytes")
    raw = mpath.read_bytes()
    hint = _bundle_hint(raw)
    if not spath.is_file() or spath.is_symlink():
        raise BundleError("unsigned", "bundle is not signed (no signature file)", bundle=hint)
    if spath.stat().st_size > limits.max_signature_bytes:
        raise BundleError("bad_signature_file", "signature file too large", bundle=hint)
    m, kid = _authenticate(raw, spath.read_bytes(), trust, appliance_version)
    bid = f"{m.bundle_id}@{m.version}"
    present = set()
    for p in root.rglob("*"):
        if p.is_symlink():
            raise BundleError("link_member", f"{p.relative_to(root)} is a link", bundle=bid)
        if p.is_file():
            present.add(p.relative_to(root).as_posix())
    for name, digest in sorted(m.files.items()):
        f = root / name
        if not f.is_file():
            raise BundleError("missing_file", f"{name} is listed in the manifest but missing", bundle=bid)
        if f.stat().st_size != m.file_sizes[name]:
            raise BundleError("hash_mismatch", f"{name} is not the size the manifest says", bundle=bid)
        if sha256_file(f) != digest:
            raise BundleError("hash_mismatch", f"{name} does not match its sha256 in the manifest", bundle=bid)
    extra = sorted(present - set(m.files) - {MANIFEST, SIGNATURE})
    if extra:
        raise BundleError("unlisted_file", f"files not listed in the manifest: {extra}", bundle=bid)
    check_external_data(root / "model.onnx", m, bundle=bid)
    return Verified(m, kid, manifest_digest(raw))


def read_manifest_unverified(path: Path, *, limits: Limits = Limits()) -> Manifest:
    """The manifest of a bundle file WITHOUT checking its signature (display and choosing what to install only;
    never a basis for trust). Reads only the first member, bounded. Raises BundleError."""
    budget = limits.max_manifest_bytes + limits.header_allowance_bytes
    with _open_stream(Path(path), budget, None) as (tar, _):
        info = _next(tar, None)
        if info is None or info.name != MANIFEST:
            raise BundleError("missing_file", "manifest.json must be the first member")
        _check_member(info, None)
        return _parse_manifest(_read_small(tar, info, limits.max_manifest_bytes, None), None)


def _extract_all(path: Path, dest: Path, limits: Limits, bundle: str | None = None) -> list[str]:
    """TOOLING ONLY (signing one's own unsigned bundle): stream every member into ``dest`` after checking name,
    type and size against ``limits``; return the names in order. The box never uses this."""
    names: list[str] = []
    total = 0
    with _open_stream(
        Path(path), limits.max_total_bytes + limits.header_allowance_bytes * limits.max_members, bundle
    ) as (
        tar,
        _,
    ):
        while (info := _next(tar, bundle)) is not None:
            name = info.name
            _check_member(info, bundle)
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
                raise BundleError("oversized_bundle", f"bundle exceeds {limits.max_total_bytes} bytes", bundle=bundle)
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(info)
            written = 0
            try:
                with open(target, "xb") as out:
                    while src is not None and (chunk := src.read(_CHUNK)):
                        written += len(chunk)
                        out.write(chunk)
            except FileExistsError as exc:
                raise BundleError("duplicate_member", f"{name!r} collides", bundle=bundle) from exc
            except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
                raise BundleError("not_a_bundle", f"corrupt archive at {name!r}: {exc}", bundle=bundle) from exc
            if written != info.size:
                raise BundleError("not_a_bundle", f"{name!r} is truncated", bundle=bundle)
            names.append(name)
    return names


def is_newer(a: str, b: str) -> bool:
    """True when version ``a`` has higher SemVer 2.0.0 precedence than ``b``."""
    return version_key(a) > version_key(b)
