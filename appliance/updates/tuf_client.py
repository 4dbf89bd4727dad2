"""The box's TUF client: what the repository says is genuine, through ``tuf.ngclient.Updater``.

Trust starts at the root metadata shipped or provisioned with the box (``updates.root_file``, default
``<state_dir>/updates/root.json``); ngclient walks the root chain (rotation, thresholds), then timestamp ->
snapshot -> targets, refusing expired metadata (freeze attack), versions lower than already seen (rollback
attack), signatures that do not meet a role's threshold (unknown or revoked keys) and files longer than
signed. The verified metadata is kept in ``<state_dir>/updates/metadata``. Target files are fetched by
:mod:`appliance.updates.fetch` (resumable) and checked here against the signed length and hashes.
"""

from __future__ import annotations

from pathlib import Path

from tuf.api import exceptions
from tuf.api.metadata import TargetFile
from tuf.ngclient import Updater, UpdaterConfig

from appliance.core.config import Settings
from appliance.updates import layout
from appliance.updates.fetch import HttpFetcher


class RepositoryRefused(Exception):
    """The repository's metadata or a target failed TUF verification (``reason``: a stable code)."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(f"{message} [{reason}]")


class RepositoryUnreachable(Exception):
    """The repository could not be reached (network, HTTP 5xx): try again later; nothing is wrong yet."""


def _refusal(exc: exceptions.RepositoryError) -> RepositoryRefused:
    if isinstance(exc, exceptions.ExpiredMetadataError):
        return RepositoryRefused("metadata_expired", f"TUF metadata expired (freeze attack or stale mirror): {exc}")
    if isinstance(exc, exceptions.BadVersionNumberError):
        return RepositoryRefused("metadata_rollback", f"TUF metadata version went back (rollback attack): {exc}")
    if isinstance(exc, exceptions.UnsignedMetadataError):
        return RepositoryRefused("metadata_signature", f"TUF metadata not signed by trusted keys: {exc}")
    if isinstance(exc, exceptions.LengthOrHashMismatchError):
        return RepositoryRefused("metadata_mismatch", f"TUF metadata length or hash mismatch: {exc}")
    return RepositoryRefused("metadata_invalid", f"TUF metadata refused: {type(exc).__name__}: {exc}")


def _cause(exc: BaseException) -> str:
    """The innermost cause of a download error (e.g. the TLS verification failure), for the reported reason."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}"[:300]


class TufClient:
    """One repository (``updates.repository_url``) trusted from one root; ``refresh()`` before each update."""

    def __init__(self, settings: Settings, fetcher: HttpFetcher):
        u = settings.updates
        self.base = u.repository_url.rstrip("/") + "/"
        self.root_file = Path(u.root_file) if u.root_file else settings.state_dir / "updates" / "root.json"
        self.metadata_dir = settings.state_dir / "updates" / "metadata"
        self.fetcher = fetcher

    def refresh(self) -> Updater:
        """A fresh ``Updater`` with top-level metadata refreshed (TUF client workflow, section 5.3).

        Raises RepositoryRefused (verification failed: expired, rolled back, badly signed),
        RepositoryUnreachable (download failed), or RepositoryRefused("no_root") without a trusted root.
        """
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        bootstrap: bytes | None = None
        if not (self.metadata_dir / "root.json").exists():
            try:
                bootstrap = self.root_file.read_bytes()
            except OSError as exc:
                raise RepositoryRefused("no_root", f"no trusted TUF root at {self.root_file}: {exc}") from exc
        try:
            updater = Updater(
                str(self.metadata_dir),
                self.base + layout.METADATA_PREFIX,
                None,
                self.base + layout.TARGETS_PREFIX,
                fetcher=self.fetcher,
                config=UpdaterConfig(prefix_targets_with_hash=True),
                bootstrap=bootstrap,
            )
            updater.refresh()
        except exceptions.RepositoryError as exc:
            raise _refusal(exc) from exc
        except exceptions.DownloadError as exc:
            raise RepositoryUnreachable(f"TUF metadata could not be fetched: {exc} ({_cause(exc)})") from exc
        return updater

    def targetinfo(self, updater: Updater, bundle_id: str, version: str) -> TargetFile | None:
        """The signed length and hashes of one bundle version, or None when the repository does not list it."""
        try:
            return updater.get_targetinfo(layout.target_path(bundle_id, version))
        except exceptions.RepositoryError as exc:
            raise _refusal(exc) from exc
        except exceptions.DownloadError as exc:
            raise RepositoryUnreachable(f"TUF targets metadata could not be fetched: {exc} ({_cause(exc)})") from exc

    def target_url(self, info: TargetFile) -> str:
        """Where a consistent-snapshot target lives: ``targets/<dir>/<sha256>.<name>`` (as ngclient builds it)."""
        sha = info.hashes.get("sha256")
        if not sha:
            raise RepositoryRefused("no_sha256", f"target {info.path} is not signed with a sha256 hash")
        dirname, sep, name = info.path.rpartition("/")
        return f"{self.base}{layout.TARGETS_PREFIX}{dirname}{sep}{sha}.{name}"

    @staticmethod
    def verify(info: TargetFile, path: Path) -> None:
        """The downloaded file is exactly the signed target (length and every hash); RepositoryRefused if not."""
        with open(path, "rb") as fh:
            try:
                info.verify_length_and_hashes(fh)
            except exceptions.LengthOrHashMismatchError as exc:
                raise RepositoryRefused(
                    "target_mismatch", f"{info.path} does not match its TUF metadata: {exc}"
                ) from exc
