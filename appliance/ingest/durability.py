"""Overlapped flushes for the C-STORE hot path, and the watermark that makes them safe across a crash.

Per instance the SCP issues two independent flushes at once: fsync of the spool file (its directory
entry is durable already: ``spool``'s reserve) and the SQLite commit (``synchronous=FULL``), and
answers Success only when both are done. On this class of disk they then share the device flush
instead of paying for it twice in a row (see docs/PERFORMANCE.md).

The price: a crash can leave a committed row whose file is not durable (missing, short or damaged).
Such a row was never acknowledged, because its file's fsync had not returned. :class:`Watermark`
tracks, in memory, the highest row id W such that every row <= W finished all its flushes, and
persists W (``<state_dir>/ingest.watermark``, written atomically about once a second and at stop).
At startup :func:`verify_after` checks every row > W (file present, size and sha256 as recorded) and
removes the rows that fail: they were never acknowledged. Rows <= W are durable and not re-read.
A missing watermark file (first start of this version) means W = 0: every row is checked once.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from pathlib import Path

from appliance.core.background import BackgroundLoop
from appliance.core.logs import get_logger
from appliance.core.store import Store
from appliance.ingest import records
from appliance.ingest.spool import Spool
from durable import write_atomic

log = get_logger(__name__)

PERSIST_INTERVAL_S = 1.0


class Watermark:
    """In-memory tracker of rows whose flushes are done, plus its durable copy on disk.

    Protocol per instance: ``token = begin()`` before the transaction; ``assign(token, row_id)``
    inside it, before COMMIT (so no committed row is ever unknown to the tracker); ``done(token)``
    once the file and the commit are both durable. A token never marked done holds the
    watermark below its row until the next restart, where that row is verified.
    """

    def __init__(self, path: Path, start: int):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._tokens = itertools.count(1)
        self._inflight: dict[int, int | None] = {}
        self._max_done = start
        self._persisted = start
        self._loop = BackgroundLoop("ingest-watermark", self._persist_pass, PERSIST_INTERVAL_S)

    @staticmethod
    def read(path: Path) -> int:
        """The persisted watermark; 0 when absent or unreadable (verify everything)."""
        try:
            return int(Path(path).read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            return 0

    def begin(self) -> int:
        with self._lock:
            token = next(self._tokens)
            self._inflight[token] = None
            return token

    def assign(self, token: int, row_id: int) -> None:
        with self._lock:
            self._inflight[token] = row_id

    def abandon(self, token: int) -> None:
        """The attempt failed: forget it if it has no row; a row it may have committed keeps the
        watermark below it until the next startup verifies it."""
        with self._lock:
            if self._inflight.get(token, 0) is None:
                del self._inflight[token]

    def done(self, token: int) -> None:
        with self._lock:
            row_id = self._inflight.pop(token, None)
            if row_id is not None and row_id > self._max_done:
                self._max_done = row_id

    def current(self) -> int:
        """Every row id <= this has finished its flushes (or was never an instance row)."""
        with self._lock:
            pending = [r for r in self._inflight.values() if r is not None]
            # tokens without a row yet will commit ids above every id committed so far
            return min(self._max_done, min(pending) - 1) if pending else self._max_done

    def persist(self) -> None:
        """Write the current watermark durably (tmp, fsync, rename, fsync dir) if it moved."""
        value = self.current()
        if value == self._persisted:
            return
        write_watermark(self.path, value)
        self._persisted = value

    # background writer: keeps the startup verification short (about one second of traffic)
    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()
        try:
            self.persist()
        except OSError as exc:
            log.error("could not write ingest watermark at stop", error=str(exc))

    def _persist_pass(self) -> None:
        self.persist()


def write_watermark(path: Path, value: int) -> None:
    write_atomic(path, f"{value}\n".encode("ascii"))


def file_matches(path: Path, size: int, sha256: str) -> bool:
    try:
        if path.stat().st_size != size:
            return False
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest() == sha256
    except OSError:
        return False


def verify_after(store: Store, spool: Spool, watermark: int) -> tuple[int, int]:
    """Startup: check rows above the watermark against their files; drop the rows that fail.

    Returns (rows checked, rows removed). A removed row's spool file (if any) is left for the sweep.
    """
    rows = store.query("SELECT id, path, size, sha256 FROM instances WHERE id > ? ORDER BY id", (watermark,))
    removed = 0
    for r in rows:
        if not file_matches(spool.abspath(r["path"]), int(r["size"]), r["sha256"]):
            records.forget_instance(store, int(r["id"]))
            removed += 1
            log.warning("unacknowledged instance record without durable file removed", path=r["path"], id=r["id"])
    return len(rows), removed
