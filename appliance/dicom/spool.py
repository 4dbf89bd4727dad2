"""The spool: received instances as Part-10 files, written durably before anything is acknowledged.

Layout: ``<spool>/<study_uid>/<sop_instance_uid>.<tag8>.dcm`` (names sanitised). A streamed instance
(``open_new``: the file is created while its fragments still arrive, before its hash is known) gets a
random ``tag8`` and O_EXCL, so two revisions or two concurrent copies of one SOP Instance UID never
collide; the database row (path, size, sha256) is what identifies it. An instance filed from one
buffer (``create``) uses the first 8 hex digits of its sha256 as ``tag8``; when that name already
exists (a leftover of an unacknowledged attempt, or a concurrent twin) ``write_durable`` is used
instead: ``.tmp-*`` -> fsync -> rename over -> fsync directory, before the commit. Either way the
caller fsyncs the file and the directory concurrently with its SQLite commit (``durability``) and
acknowledges only when all three are done.
A new study directory is made durable (fsync of the spool directory) before its first file.
A file without a row was never acknowledged and is removed at startup (``sweep``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import uuid
from pathlib import Path

from appliance.logs import get_logger

log = get_logger(__name__)

_UNSAFE = re.compile(r"[^0-9A-Za-z._-]")
TMP_PREFIX = ".tmp-"


def safe_component(uid: str) -> str:
    """A file-name-safe form of a UID; anything unusual gets a hash suffix so names stay distinct."""
    clean = _UNSAFE.sub("_", uid)[:64]
    if clean != uid or clean.startswith(".") or not clean:
        digest = hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:12]
        clean = f"x{clean.lstrip('.')[:48]}_{digest}"
    return clean


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """os.write until every byte is written (a short write is legal)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Owns the spool directory; paths stored in the database are relative to it."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def relpath(self, study_uid: str, sop_uid: str, sha256: str) -> str:
        return f"{safe_component(study_uid)}/{safe_component(sop_uid)}.{sha256[:8]}.dcm"

    def abspath(self, rel: str) -> Path:
        return self.root / rel

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def _study_dir(self, rel: str) -> tuple[Path, Path]:
        final = self.root / rel
        directory = final.parent
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.root)
        return final, directory

    def open_new(self, study_uid: str, sop_uid: str) -> tuple[int, str, Path]:
        """Create a new, empty spool file for an instance still arriving: (fd open read-write, rel, path).

        The caller writes it, then fsyncs it and its directory before acknowledging, or removes it.
        """
        base = f"{safe_component(study_uid)}/{safe_component(sop_uid)}"
        while True:
            rel = f"{base}.{secrets.token_hex(4)}.dcm"
            final, _ = self._study_dir(rel)
            try:
                return os.open(final, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640), rel, final
            except FileExistsError:  # 1 in 4 billion per revision of this UID: draw again
                continue

    def create(self, rel: str, data: bytes | bytearray) -> tuple[int, Path]:
        """Create ``rel`` (must not exist) holding ``data``; returns the open fd, not yet fsynced.

        Raises FileExistsError when the name is taken. The caller owns the fd: fsync it (and the
        directory) before acknowledging, then close it.
        """
        final, _ = self._study_dir(rel)
        fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            write_all(fd, data)
        except BaseException:
            os.close(fd)
            final.unlink(missing_ok=True)
            raise
        return fd, final

    def write_durable(self, rel: str, data: bytes | bytearray) -> Path:
        """Write ``data`` at ``rel`` so that it survives a power cut once this returns."""
        final, directory = self._study_dir(rel)
        tmp = directory / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            write_all(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, final)
        fsync_dir(directory)
        return final

    def sweep(self, known: set[str]) -> int:
        """Remove temp files and files no database row refers to (never acknowledged). Startup only."""
        removed = 0
        for directory in self.root.iterdir():
            if not directory.is_dir():
                continue
            for entry in directory.iterdir():
                rel = f"{directory.name}/{entry.name}"
                if entry.name.startswith(TMP_PREFIX) or (entry.is_file() and rel not in known):
                    entry.unlink(missing_ok=True)
                    removed += 1
                    log.info("spool file without record removed", path=rel)
            with contextlib.suppress(OSError):
                directory.rmdir()  # only succeeds when empty
        return removed
