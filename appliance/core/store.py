"""The state store: one SQLite database (WAL) in the state dir, with versioned schema migrations.

This module owns the connection settings and the migrations; each table has one owning module that
writes it (``studies`` and ``study_events``: ``appliance.lifecycle.studies``). ``synchronous=FULL`` makes
each commit durable (fsync) before it returns, which is what lets the SCP acknowledge a C-STORE only after
its record is on disk.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from appliance.core.logs import get_logger
from appliance.core.safe_names import stored_relative

MAX_INTEGER = 2**63 - 1  # SQLite's largest INTEGER: a larger Python int as a parameter raises OverflowError

log = get_logger(__name__)


def _migrations() -> list[tuple[int, str, str]]:
    out = []
    for entry in resources.files("appliance.core.migrations").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            out.append((int(name[:4]), name, entry.read_text(encoding="utf-8")))
    out.sort()
    versions = [v for v, _, _ in out]
    if len(versions) != len(set(versions)):
        raise RuntimeError(f"duplicate migration numbers: {versions}")
    return out


def now() -> float:
    return time.time()


class Store:
    """Thread-safe access to ``state.db``: one connection per thread, short transactions."""

    def __init__(self, path: Path, *, read_only: bool = False):
        """Open (creating and migrating) ``state.db`` at ``path``. ``read_only=True`` opens an existing
        database as it is, without creating, migrating or writing anything (SQLite ``mode=ro``; a look-only
        command run as another user must not leave files it owns beside the daemon's database); every
        write then raises ``sqlite3.OperationalError``."""
        self.path = Path(path)
        self.read_only = read_only
        self._local = threading.local()
        if read_only:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.migrate()

    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            conn = sqlite3.connect(
                f"file:{self.path}?mode=ro", uri=True, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout=30000")
            return conn
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA secure_delete=ON")  # deleted rows (PHI) are overwritten, not left in free pages
        # migrations make stored paths relative to the state directory (the database's folder)
        root = self.path.parent
        conn.create_function(
            "state_relpath", 1, lambda v: None if v is None else stored_relative(root, str(v)), deterministic=True
        )
        return conn

    @property
    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT; the commit is fsynced before this returns."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def query(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:
        return self.conn.execute(sql, params).fetchall()

    def schema_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> int:
        """Apply every migration newer than the database, each in its own transaction."""
        current = self.schema_version()
        for version, name, sql in _migrations():
            if version <= current:
                continue
            conn = self.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                for stmt in sql.split(";\n"):
                    if stmt.strip():
                        conn.execute(stmt)
                conn.execute(f"PRAGMA user_version={version}")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            log.info("schema migrated", db=str(self.path), migration=name, version=version)
            current = version
        return current

    def state_counts(self) -> dict[str, int]:
        rows = self.query("SELECT state, COUNT(*) AS n FROM studies GROUP BY state")
        return {r["state"]: r["n"] for r in rows}

    def write_problem(self, timeout_s: float = 2.0) -> str | None:
        """None when a writer can take ``state.db``'s write lock within ``timeout_s`` seconds (``BEGIN
        IMMEDIATE``, then rolled back: nothing is written); else why not, in one line (locked by a stuck
        writer, file gone or unreadable, read-only database, I/O error). A health check, on a short-lived
        connection of its own so that a hung check never holds a thread's connection."""
        try:
            conn = sqlite3.connect(f"file:{self.path}?mode=rw", uri=True, timeout=timeout_s, isolation_level=None)
        except sqlite3.Error as exc:
            return f"state database cannot be opened: {exc}"
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            return f"state database not writable: {exc}"
        finally:
            conn.close()
        return None

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
