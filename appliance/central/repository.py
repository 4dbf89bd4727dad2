"""The central team's TUF repository of model bundles (TUF 1.0, https://theupdateframework.github.io/specification/latest/).

One repository holds every published bundle version as a TUF target (path :func:`layout.target_path`), with
consistent snapshots, so files are never overwritten while a box reads them: only ``timestamp.json`` changes
in place. The working copy is a local folder (``repo_dir``) laid out exactly as the box reads it::

    repo_dir/metadata/<N>.root.json, <N>.targets.json, <N>.snapshot.json, timestamp.json
    repo_dir/targets/<bundle_id>/<sha256>.<bundle_id>-<version>.bundle
    repo_dir/repository.json            expiry per role (central side only, never uploaded)

:func:`upload` copies it to an Azure Blob Storage container (the field) and a plain folder can be served as
is. Online keys: ``timestamp`` (re-signed every few hours by :meth:`Repository.refresh_timestamp`, from cron),
``snapshot`` and ``targets`` (each publish); the ``root`` keys belong offline and are needed only by
:func:`init` and :meth:`Repository.rotate_key`. Private keys are unencrypted PKCS#8 PEM files, 0600, at
``keys_dir/<role>/<keyid>.pem`` (``keyid`` as TUF computes it); a retired key moves to
``keys_dir/<role>/retired/``. Every role has a threshold: metadata is written only with at least that many
of the role's keys present, else :class:`RepositoryError` names the role, the threshold and the key ids.

Before a bundle becomes a target it passes the same verification a box applies
(:func:`engines.bundle.verify_bundle`: the bundle's own Ed25519 signature over its manifest, every hash), so
the two signatures (the bundle's and TUF's) are independent defences.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from appliance.core.logs import get_logger
from appliance.updates import layout
from durable import fsync_dir, write_atomic
from engines.bundle import Verified, verify_bundle
from engines.errors import BundleError
from engines.keys import TrustStore

log = get_logger(__name__)

ROOT, TARGETS, SNAPSHOT, TIMESTAMP = Root.type, Targets.type, Snapshot.type, Timestamp.type
ROLES: tuple[str, ...] = (ROOT, TARGETS, SNAPSHOT, TIMESTAMP)
CONFIG_FILE = "repository.json"
#: Default lifetime of each role's metadata. Timestamp is short so a freeze attack is noticed within a day;
#: refresh it well inside that (cron every few hours), or every box refuses the repository as expired.
DEFAULT_EXPIRY: Mapping[str, dt.timedelta] = {
    ROOT: dt.timedelta(days=365),
    TARGETS: dt.timedelta(days=90),
    SNAPSHOT: dt.timedelta(days=7),
    TIMESTAMP: dt.timedelta(days=1),
}
_SERIALIZER = JSONSerializer(compact=False)
#: Bounds on :func:`init`'s arguments: a lifetime longer than this outlives any key rotation plan (and past
#: year 9999 cannot even be signed); more keys per role than this is a typo (each is generated and stored).
MAX_EXPIRY = dt.timedelta(days=10 * 366)
MAX_KEYS_PER_ROLE = 32


class RepositoryError(Exception):
    """A repository operation refused: missing keys, a bad bundle, a version already published differently."""


class ContainerClient(Protocol):
    """What :func:`upload` needs of ``azure.storage.blob.ContainerClient``."""

    def list_blobs(self, name_starts_with: str | None = None, **kwargs: Any) -> Iterable[Any]: ...

    def upload_blob(self, name: str, data: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class Published:
    """One bundle version added as a TUF target."""

    target_path: str  # layout.target_path(bundle_id, version)
    file: Path  # the consistent-snapshot file in repo_dir/targets
    sha256: str
    length: int  # bytes
    verified: Verified
    targets_version: int


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_key(keys_dir: Path, role: str, signer: CryptoSigner) -> Path:
    path = keys_dir / role / f"{signer.public_key.keyid}.pem"
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(signer.private_bytes)
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(path.parent)
    return path


def _load_signer(path: Path) -> CryptoSigner:
    try:
        priv = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise RepositoryError(f"{path}: not an unencrypted PEM private key ({exc})") from exc
    return CryptoSigner(priv)  # type: ignore[arg-type]


def _new_signer() -> CryptoSigner:
    return CryptoSigner.generate_ed25519()


class Repository:
    """An initialised TUF repository in ``repo_dir`` whose private keys are in ``keys_dir`` (None: read only).

    Raises :class:`RepositoryError` if ``repo_dir`` holds no repository (run :func:`init` first).
    """

    def __init__(self, repo_dir: Path, keys_dir: Path | None = None):
        self.repo_dir = Path(repo_dir)
        self._keys_dir = Path(keys_dir) if keys_dir is not None else None
        self.metadata_dir = self.repo_dir / layout.METADATA_PREFIX.rstrip("/")
        self.targets_dir = self.repo_dir / layout.TARGETS_PREFIX.rstrip("/")
        cfg = self.repo_dir / CONFIG_FILE
        if not cfg.is_file() or not self.metadata_dir.is_dir():
            raise RepositoryError(f"{self.repo_dir} is not a repository (no {CONFIG_FILE}); run `repo init` first")
        try:
            doc = json.loads(cfg.read_text())
            self.expiry = {r: dt.timedelta(seconds=float(doc["expiry_s"][r])) for r in ROLES}
        except (ValueError, KeyError, TypeError) as exc:
            raise RepositoryError(f"{cfg}: unreadable ({exc})") from exc

    @property
    def keys_dir(self) -> Path:
        """The private keys' folder; :class:`RepositoryError` if the repository was opened read-only."""
        if self._keys_dir is None:
            raise RepositoryError("this operation signs metadata: give the keys folder")
        return self._keys_dir

    # -- reading ------------------------------------------------------------------------------------------

    def root_version(self) -> int:
        """The highest N with ``metadata/N.root.json``."""
        versions = [int(p.name.split(".", 1)[0]) for p in self.metadata_dir.glob("*.root.json")]
        if not versions:
            raise RepositoryError(f"{self.metadata_dir}: no root metadata")
        return max(versions)

    def root_path(self, version: int | None = None) -> Path:
        """``metadata/N.root.json`` (the newest when ``version`` is None): what a box ships as trusted root."""
        return self.metadata_dir / f"{version or self.root_version()}.root.json"

    def root(self) -> Metadata[Root]:
        return Metadata[Root].from_file(str(self.root_path()))

    def timestamp(self) -> Metadata[Timestamp]:
        return Metadata[Timestamp].from_file(str(self.metadata_dir / "timestamp.json"))

    def snapshot(self) -> Metadata[Snapshot]:
        v = self.timestamp().signed.snapshot_meta.version
        return Metadata[Snapshot].from_file(str(self.metadata_dir / f"{v}.snapshot.json"))

    def targets(self) -> Metadata[Targets]:
        v = self.snapshot().signed.meta["targets.json"].version
        return Metadata[Targets].from_file(str(self.metadata_dir / f"{v}.targets.json"))

    def target_file(self, target_path: str) -> Path:
        """The consistent-snapshot file of ``target_path`` (``dir/<sha256>.name``), as the box downloads it."""
        info = self.targets().signed.targets[target_path]
        dirname, _, base = target_path.rpartition("/")
        return self.targets_dir / dirname / f"{info.hashes['sha256']}.{base}"

    # -- keys ---------------------------------------------------------------------------------------------

    def signers(self, role: str, root: Root | None = None) -> list[CryptoSigner]:
        """The private keys of ``role`` found in ``keys_dir``, at least its threshold.

        Raises :class:`RepositoryError` naming the role, threshold and missing key ids when too few are present.
        """
        root = root or self.root().signed
        return _signers_for(self.keys_dir, root, role)

    # -- writing ------------------------------------------------------------------------------------------

    def _write(self, name: str, md: Metadata[Any]) -> Path:
        path = self.metadata_dir / name
        write_atomic(path, md.to_bytes(_SERIALIZER), mode=0o644)
        return path

    def _sign(self, md: Metadata[Any], role: str, root: Root) -> None:
        md.signatures.clear()
        for s in _signers_for(self.keys_dir, root, role):
            md.sign(s, append=True)

    def _bump(self, md: Metadata[Any], role: str) -> None:
        md.signed.version += 1
        md.signed.expires = _utcnow() + self.expiry[role]

    def _commit(self, root: Root, *, targets: Metadata[Targets] | None = None) -> int:
        """Write targets (when given), then a new snapshot, then a new timestamp: that order, so a reader
        never finds a timestamp naming a file that does not exist yet. Returns the snapshot version."""
        snap = self.snapshot()
        if targets is not None:
            self._sign(targets, TARGETS, root)
            self._write(f"{targets.signed.version}.targets.json", targets)
            snap.signed.meta["targets.json"] = MetaFile(targets.signed.version)
        self._bump(snap, SNAPSHOT)
        self._sign(snap, SNAPSHOT, root)
        self._write(f"{snap.signed.version}.snapshot.json", snap)
        ts = self.timestamp()
        self._bump(ts, TIMESTAMP)
        ts.signed.snapshot_meta = MetaFile(snap.signed.version)
        self._sign(ts, TIMESTAMP, root)
        self._write("timestamp.json", ts)
        return snap.signed.version

    def publish(self, bundle_file: Path, trust: TrustStore, *, appliance_version: str | None = None) -> Published:
        """Verify ``bundle_file`` and add it as target ``layout.target_path(bundle_id, version)``.

        The bundle must pass :func:`engines.bundle.verify_bundle` with ``trust`` (its Ed25519 signature and
        manifest hashes). Targets, snapshot and timestamp are re-signed with new versions. A version already
        published with the same bytes is a no-op (returns the existing target); with other bytes it is refused,
        since boxes may already hold the first. Raises :class:`RepositoryError` (bad bundle, conflict, keys).
        """
        bundle_file = Path(bundle_file)
        try:
            verified = verify_bundle(bundle_file, trust, appliance_version=appliance_version)
        except BundleError as exc:
            raise RepositoryError(f"{bundle_file.name}: refused, bundle verification failed: {exc}") from exc
        m = verified.manifest
        tpath = layout.target_path(m.bundle_id, m.version)
        digest = _sha256(bundle_file)
        root = self.root().signed
        targets = self.targets()
        existing = targets.signed.targets.get(tpath)
        dirname, _, base = tpath.rpartition("/")
        dest = self.targets_dir / dirname / f"{digest}.{base}"
        if existing is not None:
            if existing.hashes.get("sha256") != digest:
                raise RepositoryError(
                    f"{tpath} is already published with other content (sha256 {existing.hashes.get('sha256')}); "
                    "publish a new version instead"
                )
            return Published(tpath, dest, digest, existing.length, verified, targets.signed.version)
        # The signers must be there before anything is written.
        for role in (TARGETS, SNAPSHOT, TIMESTAMP):
            _signers_for(self.keys_dir, root, role)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(bundle_file, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        if _sha256(tmp) != digest:
            tmp.unlink()
            raise RepositoryError(f"{bundle_file} changed while it was being published")
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        info = TargetFile.from_file(tpath, str(dest), ["sha256"])
        info.unrecognized_fields["custom"] = {
            "bundle_id": m.bundle_id,
            "version": m.version,
            "task": m.task,
            "manifest_sha256": verified.digest,
            "signing_key_id": verified.key_id,
        }
        targets.signed.targets[tpath] = info
        self._bump(targets, TARGETS)
        self._commit(root, targets=targets)
        log.info(
            "repository.published",
            target=tpath,
            sha256=digest,
            length=info.length,
            targets_version=targets.signed.version,
        )
        return Published(tpath, dest, digest, info.length, verified, targets.signed.version)

    def refresh_timestamp(self) -> int:
        """Re-sign ``timestamp.json`` with a new version and expiry (run from cron well inside its lifetime).

        Returns the new timestamp version. Needs only the timestamp key(s).
        """
        root = self.root().signed
        ts = self.timestamp()
        self._bump(ts, TIMESTAMP)
        self._sign(ts, TIMESTAMP, root)
        self._write("timestamp.json", ts)
        log.info("repository.timestamp_refreshed", version=ts.signed.version, expires=str(ts.signed.expires))
        return ts.signed.version

    def refresh(self) -> dict[str, int]:
        """Keep the online metadata alive: re-sign targets and/or snapshot once past half their lifetime,
        and always the timestamp. Returns ``{role: new version}`` for what was re-signed.

        Run from cron more often than the timestamp lifetime (e.g. every 6 h for 1 day). Root is not
        touched (its keys are offline): :meth:`root_expires` says when it needs :meth:`rotate_key`.
        """
        root = self.root().signed
        now = _utcnow()
        targets, snap = self.targets(), self.snapshot()
        done: dict[str, int] = {}
        if targets.signed.expires - now < self.expiry[TARGETS] / 2:
            self._bump(targets, TARGETS)
            done[SNAPSHOT] = self._commit(root, targets=targets)
            done[TARGETS] = targets.signed.version
        elif snap.signed.expires - now < self.expiry[SNAPSHOT] / 2:
            done[SNAPSHOT] = self._commit(root)
        else:
            self.refresh_timestamp()
        done[TIMESTAMP] = self.timestamp().signed.version
        return done

    def root_expires(self) -> dt.datetime:
        """When the newest root metadata expires (boxes refuse the repository after that)."""
        return self.root().signed.expires

    def rotate_key(self, role: str, old_keyid: str | None = None) -> str:
        """Replace one key of ``role`` with a newly generated one; returns the new key id.

        Writes ``N+1.root.json`` listing the new key instead of ``old_keyid`` (default: the role's only key),
        signed by a threshold of the old root keys and of the new ones (TUF 5.3.4: a box accepts root N+1
        only when both verify). For the other roles the role's metadata is then re-signed with the new key
        (and snapshot/timestamp bumped), so no box ever sees metadata its trusted root cannot verify. The old
        private key moves to ``keys_dir/<role>/retired/``. Raises :class:`RepositoryError` when a needed key
        is missing (nothing is written then) or ``old_keyid`` is not a key of ``role``.
        """
        if role not in ROLES:
            raise RepositoryError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
        old_md = self.root()
        old_root = old_md.signed
        current = list(old_root.roles[role].keyids)
        if old_keyid is None:
            if len(current) != 1:
                raise RepositoryError(f"{role} has {len(current)} keys; name the one to replace")
            old_keyid = current[0]
        if old_keyid not in current:
            raise RepositoryError(f"{old_keyid} is not a key of {role} (its keys: {', '.join(current)})")
        old_root_signers = _signers_for(self.keys_dir, old_root, ROOT)
        # what is re-signed after the new root must be signable too, or boxes would get a root its metadata fails
        for after in {TARGETS: (SNAPSHOT, TIMESTAMP), SNAPSHOT: (TIMESTAMP,)}.get(role, ()):
            _signers_for(self.keys_dir, old_root, after)
        if role != ROOT:
            # the role re-signs with the new key; its other keys (if any) must be present too
            others = [k for k in current if k != old_keyid]
            need = old_root.roles[role].threshold - 1
            have = [k for k in others if (self.keys_dir / role / f"{k}.pem").is_file()]
            if len(have) < need:
                raise RepositoryError(
                    f"rotating {role}: threshold {need + 1} needs {need} more of its keys in {self.keys_dir / role}, "
                    f"found {len(have)}"
                )
        new_signer = _new_signer()
        new_md = Metadata[Root].from_bytes(old_md.to_bytes())  # a deep copy: to_dict shares lists
        new_root = new_md.signed
        new_root.revoke_key(old_keyid, role)
        new_root.add_key(new_signer.public_key, role)
        new_root.version += 1
        new_root.expires = _utcnow() + self.expiry[ROOT]
        new_path = _write_key(self.keys_dir, role, new_signer)
        try:
            new_md.signatures.clear()
            signers = list(old_root_signers)
            if role == ROOT:
                ids = {s.public_key.keyid for s in signers}
                signers += [s for s in _signers_for(self.keys_dir, new_root, ROOT) if s.public_key.keyid not in ids]
            else:
                signers = _signers_for(self.keys_dir, new_root, ROOT)
            for s in signers:
                new_md.sign(s, append=True)
            new_md.verify_delegate(ROOT, new_md)  # threshold of the new root
            old_md.verify_delegate(ROOT, new_md)  # threshold of the old root
        except Exception:
            new_path.unlink(missing_ok=True)
            raise
        self._write(f"{new_root.version}.root.json", new_md)
        self._retire(role, old_keyid)
        if role == TARGETS:
            t = self.targets()
            self._bump(t, TARGETS)
            self._commit(new_root, targets=t)
        elif role == SNAPSHOT:
            self._commit(new_root)
        elif role == TIMESTAMP:
            self.refresh_timestamp()
        log.info("repository.key_rotated", role=role, old=old_keyid, new=new_signer.public_key.keyid)
        return str(new_signer.public_key.keyid)

    def _retire(self, role: str, keyid: str) -> None:
        src = self.keys_dir / role / f"{keyid}.pem"
        if src.is_file():
            dst = self.keys_dir / role / "retired" / src.name
            dst.parent.mkdir(mode=0o700, exist_ok=True)
            os.replace(src, dst)
            fsync_dir(src.parent)


def _signers_for(keys_dir: Path, root: Root, role: str) -> list[CryptoSigner]:
    r = root.roles[role]
    found = []
    for keyid in r.keyids:
        path = keys_dir / role / f"{keyid}.pem"
        if path.is_file():
            signer = _load_signer(path)
            if signer.public_key.keyid != keyid:
                raise RepositoryError(f"{path}: holds key {signer.public_key.keyid}, not {keyid}")
            found.append(signer)
    if len(found) < r.threshold:
        missing = [k for k in r.keyids if not (keys_dir / role / f"{k}.pem").is_file()]
        raise RepositoryError(
            f"role {role} needs {r.threshold} of its keys to sign; {len(found)} found in {keys_dir / role} "
            f"(missing: {', '.join(missing)})"
        )
    return found


def init(
    repo_dir: Path,
    keys_dir: Path,
    *,
    expiry: Mapping[str, dt.timedelta] | None = None,
    threshold: Mapping[str, int] | int = 1,
    keys: Mapping[str, int] | None = None,
) -> Repository:
    """Create an empty repository: new keys per role, ``1.root.json``, targets/snapshot/timestamp version 1.

    ``expiry`` overrides :data:`DEFAULT_EXPIRY` per role; ``threshold`` is the number of signatures each role
    needs (one int for all, or per role); ``keys`` the number of keys made per role (default: its threshold,
    at least 1). Private keys go to ``keys_dir/<role>/<keyid>.pem`` (0600). Raises :class:`RepositoryError`
    if ``repo_dir`` already holds a repository or a number is out of range.
    """
    repo_dir, keys_dir = Path(repo_dir), Path(keys_dir)
    if (repo_dir / CONFIG_FILE).exists() or (repo_dir / layout.METADATA_PREFIX).exists():
        raise RepositoryError(f"{repo_dir} already holds a repository; refusing to overwrite it")
    exp = {**DEFAULT_EXPIRY, **(expiry or {})}
    thr = {r: (threshold if isinstance(threshold, int) else threshold.get(r, 1)) for r in ROLES}
    counts = {r: (keys or {}).get(r, thr[r]) for r in ROLES}
    for r in ROLES:
        if thr[r] < 1 or counts[r] < thr[r]:
            raise RepositoryError(f"{r}: threshold {thr[r]} with {counts[r]} keys is impossible")
        if counts[r] > MAX_KEYS_PER_ROLE:
            raise RepositoryError(f"{r}: {counts[r]} keys; at most {MAX_KEYS_PER_ROLE} per role")
        if exp[r] <= dt.timedelta(0):
            raise RepositoryError(f"{r}: expiry must be positive")
        if exp[r] > MAX_EXPIRY:
            raise RepositoryError(f"{r}: expiry {exp[r].days} days; at most {MAX_EXPIRY.days}")
    keys_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(keys_dir, 0o700)
    (repo_dir / layout.METADATA_PREFIX).mkdir(parents=True)
    (repo_dir / layout.TARGETS_PREFIX).mkdir(parents=True, exist_ok=True)
    now = _utcnow()
    root = Root(expires=now + exp[ROOT], consistent_snapshot=True)
    by_role: dict[str, list[CryptoSigner]] = {}
    for r in ROLES:
        by_role[r] = [_new_signer() for _ in range(counts[r])]
        for s in by_role[r]:
            _write_key(keys_dir, r, s)
            root.add_key(s.public_key, r)
        root.roles[r].threshold = thr[r]
    targets = Targets(expires=now + exp[TARGETS])
    snapshot = Snapshot(expires=now + exp[SNAPSHOT])
    timestamp = Timestamp(expires=now + exp[TIMESTAMP])
    docs: dict[str, Metadata[Any]] = {
        ROOT: Metadata(root),
        TARGETS: Metadata(targets),
        SNAPSHOT: Metadata(snapshot),
        TIMESTAMP: Metadata(timestamp),
    }
    for r, md in docs.items():
        for s in by_role[r]:
            md.sign(s, append=True)
    write_atomic(
        repo_dir / CONFIG_FILE,
        json.dumps({"expiry_s": {r: exp[r].total_seconds() for r in ROLES}}, indent=1).encode(),
        mode=0o644,
    )
    md_dir = repo_dir / layout.METADATA_PREFIX
    for name, md in (
        ("1.root.json", docs[ROOT]),
        ("1.targets.json", docs[TARGETS]),
        ("1.snapshot.json", docs[SNAPSHOT]),
        ("timestamp.json", docs[TIMESTAMP]),
    ):
        write_atomic(md_dir / name, md.to_bytes(_SERIALIZER), mode=0o644)
    log.info("repository.initialised", repo=str(repo_dir), thresholds=thr)
    return Repository(repo_dir, keys_dir)


# -- Azure Blob Storage -------------------------------------------------------------------------------------

METADATA_CACHE_CONTROL = "no-cache"
TARGET_CACHE_CONTROL = "public, max-age=31536000, immutable"


def upload(repo: Repository, container_client: ContainerClient) -> list[str]:
    """Copy the repository to a Blob Storage container with the same layout; returns the blob names written.

    Order: target files, root chain, versioned targets/snapshot, then ``timestamp.json`` last, so a box
    reading during an upload never finds a timestamp naming a file not yet there. Versioned files and
    targets are immutable: a blob already present with that name is kept (its size must match; a mismatch
    raises :class:`RepositoryError`). Metadata goes up as ``application/json`` with ``Cache-Control: no-cache``;
    targets as ``application/octet-stream``, cacheable for ever.
    """
    from azure.storage.blob import ContentSettings

    existing: dict[str, int] = {
        b.name: int(b.size) for b in container_client.list_blobs() if not b.name.endswith("timestamp.json")
    }
    targets = sorted(p for p in repo.targets_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    roots = sorted(repo.metadata_dir.glob("*.root.json"), key=lambda p: int(p.name.split(".", 1)[0]))
    versioned = sorted(
        (p for p in repo.metadata_dir.glob("*.json") if p.name != "timestamp.json" and p not in roots),
        key=lambda p: (int(p.name.split(".", 1)[0]), p.name),
    )
    plan = [(p, layout.TARGETS_PREFIX + p.relative_to(repo.targets_dir).as_posix(), False) for p in targets]
    plan += [(p, layout.METADATA_PREFIX + p.name, True) for p in (*roots, *versioned)]
    plan.append((repo.metadata_dir / "timestamp.json", layout.METADATA_PREFIX + "timestamp.json", True))
    written = []
    for path, name, is_meta in plan:
        size = path.stat().st_size
        if name in existing:
            if existing[name] != size:
                raise RepositoryError(f"blob {name} exists with {existing[name]} bytes, local file has {size}")
            continue
        settings = (
            ContentSettings(content_type="application/json", cache_control=METADATA_CACHE_CONTROL)
            if is_meta
            else ContentSettings(content_type="application/octet-stream", cache_control=TARGET_CACHE_CONTROL)
        )
        with open(path, "rb") as fh:
            container_client.upload_blob(name, fh, overwrite=True, length=size, content_settings=settings)
        written.append(name)
    log.info("repository.uploaded", blobs=len(written))
    return written
