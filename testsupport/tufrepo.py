"""A TUF repository of model bundles for tests, made with the central team's own code
(:mod:`appliance.central.repository`), so box-side tests read exactly what ``appliance central repo`` writes."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from appliance.central import repository as R
from engines.keys import TrustStore


@dataclass
class RepoHandle:
    """A repository in ``repo_dir`` (``metadata/``, ``targets/``) with its private keys in ``keys_dir``."""

    repo: R.Repository
    trust: TrustStore  # the bundle-signing keys publish verifies against

    @property
    def repo_dir(self) -> Path:
        return self.repo.repo_dir

    @property
    def keys_dir(self) -> Path:
        return self.repo.keys_dir

    @property
    def metadata_dir(self) -> Path:
        return self.repo.metadata_dir

    @property
    def targets_dir(self) -> Path:
        return self.repo.targets_dir

    @property
    def root_path(self) -> Path:
        """``metadata/1.root.json``: the root a box ships with (it walks the chain from there)."""
        return self.repo.root_path(1)

    def publish(self, bundle: Path) -> R.Published:
        return self.repo.publish(bundle, self.trust)


def make_repository(
    tmp: Path,
    bundles: Iterable[Path] = (),
    *,
    trust: TrustStore | None = None,
    expiry: Mapping[str, dt.timedelta] | None = None,
    threshold: Mapping[str, int] | int = 1,
) -> RepoHandle:
    """Init a repository under ``tmp/repo`` (keys in ``tmp/tuf-keys``) and publish ``bundles`` (signed bundle
    files, e.g. from :func:`testsupport.bundles.make_bundle`, verified against ``trust``) in order."""
    repo = R.init(tmp / "repo", tmp / "tuf-keys", expiry=expiry, threshold=threshold)
    handle = RepoHandle(repo, trust or TrustStore())
    for b in bundles:
        handle.publish(b)
    return handle
