"""The spool: received instances as Part-10 files, written durably before anything is acknowledged.

Layout: ``<spool>/<YYYYMMDD>/<16 hex>.dcm`` (UTC day the file was made ready). The database row (path,
size, sha256, study, SOP Instance UID) is what identifies a file; the name carries no meaning, so two
revisions or two concurrent copies of one SOP Instance UID never collide.

Files come from a small *reserve*: a background loop creates empty files ahead of need and fsyncs
their directory once per batch, so a file handed out by :meth:`Spool.take` already has a durable
directory entry. Receiving an instance then costs one write pass and one fsync of the file (beside
the SQLite commit, see ``scp``), with no file creation and no directory fsync on the path to the
acknowledgement (both cost more than the fsync itself under load, docs/PERFORMANCE.md). When the
reserve is empty (a burst beyond it, or before the loop started) ``take`` creates the file and fsyncs
its directory inline: slower, same guarantee.
A file without a row was never acknowledged (or is an unused reserve file) and is removed at startup
(``sweep``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from appliance.core.background import BackgroundLoop
from appliance.core.logs import get_logger
from appliance.core.safe_names import resolve_under
from durable import fsync_dir

log = get_logger(__name__)

RESERVE_SIZE = 32  # ready files; refilled when half are used
RESERVE_IDLE_S = 60.0  # besides being woken by take(), the loop tops the reserve up once a minute


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """os.write until every byte is written (a short write is legal)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def read_all(fd: int, n: int) -> bytes:
    """The first ``n`` bytes of the file ``fd`` (pread until done: a short read is legal)."""
    parts, offset = [], 0
    while offset < n:
        chunk = os.pread(fd, n - offset, offset)
        if not chunk:
            raise OSError(f"file ended after {offset} of {n} bytes")
        parts.append(chunk)
        offset += len(chunk)
    return b"".join(parts)


@dataclass(frozen=True)
class SpoolFile:
    """An empty spool file whose directory entry is durable, open read-write; the taker owns ``fd``."""

    fd: int
    rel: str
    path: Path


class Spool:
    """Owns the spool directory; paths stored in the database are relative to it."""

    def __init__(self, root: Path, reserve_size: int = RESERVE_SIZE):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.reserve_size = reserve_size
        self._ready: deque[SpoolFile] = deque()
        self._make_lock = threading.Lock()  # one creator at a time: day directory and batch fsync
        self._loop = BackgroundLoop("spool-reserve", self._refill, RESERVE_IDLE_S)
        self.inline_creates = 0  # takes that found the reserve empty (diagnostics, tests)

    def abspath(self, rel: str) -> Path:
        """The file of a stored (relative) spool path; raises ``UnsafePath`` for one leaving the spool."""
        return resolve_under(self.root, rel)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    # --- the reserve ----------------------------------------------------------------------------
    def start(self) -> None:
        """Keep the reserve filled in the background (after ``sweep``: it removes unused files)."""
        self._loop.start()

    def stop(self) -> None:
        """Stop refilling; close and remove the files still in reserve (never used, no row)."""
        self._loop.stop()
        while self._ready:
            f = self._ready.popleft()
            os.close(f.fd)
            f.path.unlink(missing_ok=True)

    def take(self) -> SpoolFile:
        """An empty file for one instance, its directory entry already durable.

        The caller writes it, fsyncs it (the file only) before acknowledging, and closes it; on
        failure it removes it (``discard``).
        """
        try:
            f = self._ready.popleft()
        except IndexError:
            self.inline_creates += 1
            f = self._make(1)[0]
        if len(self._ready) <= self.reserve_size // 2:
            self._loop.wake()
        return f

    @staticmethod
    def discard(f: SpoolFile) -> None:
        os.close(f.fd)
        f.path.unlink(missing_ok=True)

    def _refill(self) -> None:
        want = self.reserve_size - len(self._ready)
        if want > 0:
            self._ready.extend(self._make(want))

    def _make(self, n: int) -> list[SpoolFile]:
        """Create ``n`` empty files in today's directory and make their entries durable (one fsync)."""
        with self._make_lock:
            day = time.strftime("%Y%m%d", time.gmtime())
            directory = self.root / day
            if not directory.is_dir():
                directory.mkdir(exist_ok=True)
                fsync_dir(self.root)  # the day directory's own entry, before any file in it counts
            made: list[SpoolFile] = []
            try:
                while len(made) < n:
                    rel = f"{day}/{secrets.token_hex(8)}.dcm"
                    try:
                        fd = os.open(self.root / rel, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
                    except FileExistsError:  # 1 in 2**64: draw again
                        continue
                    made.append(SpoolFile(fd, rel, self.root / rel))
                fsync_dir(directory)
            except BaseException:
                for f in made:
                    self.discard(f)
                raise
            return made

    # --- startup ---------------------------------------------------------------------------------
    def sweep(self, known: set[str]) -> int:
        """Remove files no database row refers to: never acknowledged (removed, logged each) or unused
        reserve files (empty, counted). Startup only, before ``start``; returns the files removed
        that held data."""
        removed = unused = 0
        for directory in self.root.iterdir():
            if not directory.is_dir():
                continue
            for entry in directory.iterdir():
                rel = f"{directory.name}/{entry.name}"
                if rel in known or not entry.is_file():
                    continue
                empty = entry.stat().st_size == 0
                entry.unlink(missing_ok=True)
                if empty:
                    unused += 1
                else:
                    removed += 1
                    log.info("spool file without record removed", path=rel)
            with contextlib.suppress(OSError):
                directory.rmdir()  # only succeeds when empty
        if unused:
            log.debug("unused reserve files removed", count=unused)
        return removed


def remove_leftovers(root: Path, known: set[str], older_than: float) -> int:
    """Retention's pass over a running spool: delete every non-empty file no instance row refers to (``known``:
    paths relative to ``root``, read *before* this call) whose last change is before ``older_than`` (epoch
    seconds), then empty day folders unchanged since then. Empty files are the reserve's and stay. Returns the
    files deleted."""
    removed = 0
    if not root.is_dir():
        return 0
    for directory in root.iterdir():
        if not directory.is_dir() or directory.is_symlink():
            continue
        for entry in directory.iterdir():
            rel = f"{directory.name}/{entry.name}"
            if rel in known or entry.is_symlink() or not entry.is_file():
                continue
            st = entry.stat()
            if st.st_size == 0 or st.st_mtime >= older_than:
                continue
            entry.unlink(missing_ok=True)
            removed += 1
        if directory.stat().st_mtime < older_than:  # never a day folder the reserve may be filling now
            with contextlib.suppress(OSError):
                directory.rmdir()  # only succeeds when empty
    return removed
