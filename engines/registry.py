"""Installed bundles and the active version of each, kept in files under the models directory.

Layout::

    <models_dir>/bundles/<bundle_id>/<version>/   unpacked, verified bundle (manifest.json, signature, ...)
    <models_dir>/bundles/<bundle_id>/state.json   {"active", "previous", "installed", "failures", "history"}
    <models_dir>/bundles/.lock                    flock held while state changes

Why files and not the appliance's SQLite store: ``engines`` imports nothing of the appliance. Every state
change is one JSON file written to a temp name, fsynced and renamed over the old one, so a power cut
leaves either the old or the new state, never a mix. Versions never go down unless ``force`` is given;
rollback is the one explicit way back to the previous version.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from durable import replace_durably, write_atomic
from engines.bundle import Limits, Verified, unpack_bundle, verify_dir
from engines.errors import BundleError
from engines.keys import TrustStore
from engines.manifest import BUNDLE_ID, Manifest, parse_manifest_bytes, version_key

_HISTORY_MAX = 50


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def write_json_atomic(path: Path, doc: Any) -> None:
    write_atomic(path, json.dumps(doc, indent=2, sort_keys=True).encode("utf-8"))


@dataclass(frozen=True)
class InstalledBundle:
    bundle_id: str
    version: str
    path: Path
    active: bool
    previous: bool
    key_id: str
    digest: str
    installed_at: str
    failure: dict | None


class Registry:
    """The bundles installed on this box. Thread/process safe for writers via an flock."""

    def __init__(self, models_dir: Path, trust: TrustStore):
        """``trust`` is required: every install and re-verification checks signatures against it (there is no
        unsigned mode). Raises TypeError for anything but a :class:`TrustStore`."""
        if not isinstance(trust, TrustStore):
            raise TypeError(f"trust must be a TrustStore, not {type(trust).__name__}: signatures are never skipped")
        self.models_dir = Path(models_dir)
        self.root = self.models_dir / "bundles"
        self.trust = trust

    # -- state files -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _state_path(self, bundle_id: str) -> Path:
        if not BUNDLE_ID.match(bundle_id):
            raise BundleError("not_installed", f"invalid bundle id {bundle_id!r}")
        return self.root / bundle_id / "state.json"

    def state(self, bundle_id: str) -> dict[str, Any]:
        path = self._state_path(bundle_id)
        if not path.exists():
            return {"active": None, "previous": None, "installed": {}, "failures": {}, "history": []}
        return json.loads(path.read_text(encoding="utf-8"))

    def _save(self, bundle_id: str, state: dict[str, Any], event: str, **detail: Any) -> None:
        state.setdefault("history", []).append({"at": _now(), "event": event, **detail})
        state["history"] = state["history"][-_HISTORY_MAX:]
        write_json_atomic(self._state_path(bundle_id), state)

    # -- queries -----------------------------------------------------------------------------------
    def bundle_ids(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and (p / "state.json").exists())

    def list(self) -> list[InstalledBundle]:
        out = []
        for bid in self.bundle_ids():
            st = self.state(bid)
            for version, info in sorted(st["installed"].items(), key=lambda kv: version_key(kv[0])):
                out.append(
                    InstalledBundle(
                        bid,
                        version,
                        self.root / bid / version,
                        st["active"] == version,
                        st["previous"] == version,
                        info.get("key_id", ""),
                        info.get("digest", ""),
                        info.get("installed_at", ""),
                        st["failures"].get(version),
                    )
                )
        return out

    def active_version(self, bundle_id: str) -> str | None:
        return self.state(bundle_id)["active"]

    def version_dir(self, bundle_id: str, version: str | None = None) -> Path:
        st = self.state(bundle_id)
        version = version or st["active"]
        if version is None:
            raise BundleError("no_active_version", "no active version", bundle=bundle_id)
        if version not in st["installed"]:
            raise BundleError("not_installed", f"version {version} is not installed", bundle=bundle_id)
        return self.root / bundle_id / version

    def verify_installed(self, bundle_id: str, version: str | None = None) -> Verified:
        """Re-check an installed version on disk (signature with the CURRENT trust store, every hash)."""
        return verify_dir(self.version_dir(bundle_id, version), self.trust)

    def manifest(self, bundle_id: str, version: str | None = None) -> Manifest:
        path = self.version_dir(bundle_id, version) / "manifest.json"
        return parse_manifest_bytes(path.read_bytes())

    # -- changes -----------------------------------------------------------------------------------
    def install(
        self,
        bundle_path: Path,
        *,
        force: bool = False,
        limits: Limits = Limits(),
        appliance_version: str | None = None,
    ) -> Verified:
        """Verify (in the safe order of :func:`engines.bundle.unpack_bundle`) and unpack a bundle file. Does not
        activate it. Refuses a downgrade (SemVer 2.0.0 precedence) unless ``force``. Raises BundleError."""
        self.root.mkdir(parents=True, exist_ok=True)
        incoming = self.root / ".incoming"
        incoming.mkdir(exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="b-", dir=incoming)) / "b"
        try:
            verified = unpack_bundle(
                Path(bundle_path), staging, self.trust, limits=limits, appliance_version=appliance_version
            )
            m = verified.manifest
            bid = f"{m.bundle_id}@{m.version}"
            with self._locked():
                st = self.state(m.bundle_id)
                have = st["installed"].get(m.version)
                if have is not None:
                    if have.get("digest") == verified.digest:
                        return verified  # same bundle again: nothing to do
                    raise BundleError(
                        "version_conflict", "a different bundle with this version is already installed", bundle=bid
                    )
                reference = st["active"] or max(st["installed"], key=version_key, default=None)
                if reference and version_key(m.version) < version_key(reference) and not force:
                    raise BundleError("downgrade", f"{m.version} is older than {reference}", bundle=bid)
                target = self.root / m.bundle_id / m.version
                if target.exists():  # leftover of an interrupted install that never reached state.json
                    shutil.rmtree(target)
                target.parent.mkdir(parents=True, exist_ok=True)
                replace_durably(staging, target)  # durable before state.json names it
                st["installed"][m.version] = {
                    "installed_at": _now(),
                    "key_id": verified.key_id,
                    "digest": verified.digest,
                    "forced": bool(force and reference and version_key(m.version) < version_key(reference)),
                }
                self._save(m.bundle_id, st, "installed", version=m.version, key_id=verified.key_id)
            return verified
        finally:
            shutil.rmtree(staging.parent, ignore_errors=True)

    def activate(self, bundle_id: str, version: str, *, force: bool = False) -> str | None:
        """Make ``version`` active atomically; the old active one becomes ``previous``. Returns it."""
        with self._locked():
            st = self.state(bundle_id)
            bid = f"{bundle_id}@{version}"
            if version not in st["installed"]:
                raise BundleError("not_installed", f"version {version} is not installed", bundle=bundle_id)
            if version in st["failures"] and not force:
                reason = st["failures"][version].get("reason")
                raise BundleError("failed_check", f"version failed its check before ({reason})", bundle=bid)
            old = st["active"]
            if old == version:
                return old
            if old and version_key(version) < version_key(old) and not force:
                raise BundleError("downgrade", f"{version} is older than active {old}", bundle=bid)
            st["previous"], st["active"] = old, version
            self._save(bundle_id, st, "activated", version=version, previous=old, forced=force)
            return old

    def rollback(self, bundle_id: str) -> str:
        """Switch back to the previous version (the one explicit way down); returns the now-active version."""
        with self._locked():
            st = self.state(bundle_id)
            prev = st["previous"]
            if not prev or prev not in st["installed"]:
                raise BundleError("no_previous", "no previous version to roll back to", bundle=bundle_id)
            st["previous"], st["active"] = st["active"], prev
            self._save(bundle_id, st, "rolled_back", version=prev, from_version=st["previous"])
            return prev

    def record_failure(self, bundle_id: str, version: str, reason: str, detail: str) -> None:
        """Remember why a version may not be activated (e.g. golden mismatch on this hardware)."""
        with self._locked():
            st = self.state(bundle_id)
            st["failures"][version] = {"reason": reason, "detail": detail[:2000], "at": _now()}
            self._save(bundle_id, st, "failed", version=version, reason=reason)

    def clear_failure(self, bundle_id: str, version: str) -> None:
        with self._locked():
            st = self.state(bundle_id)
            if st["failures"].pop(version, None) is not None:
                self._save(bundle_id, st, "failure_cleared", version=version)

    def remove(self, bundle_id: str, version: str) -> None:
        """Delete an installed version that is neither active nor the rollback target."""
        with self._locked():
            st = self.state(bundle_id)
            if version not in st["installed"]:
                raise BundleError("not_installed", f"version {version} is not installed", bundle=bundle_id)
            if version in (st["active"], st["previous"]):
                raise BundleError("in_use", f"version {version} is active or the rollback target", bundle=bundle_id)
            del st["installed"][version]
            st["failures"].pop(version, None)
            self._save(bundle_id, st, "removed", version=version)
            shutil.rmtree(self.root / bundle_id / version, ignore_errors=True)
