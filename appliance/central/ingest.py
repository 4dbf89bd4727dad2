"""``appliance central ingest``: hub events -> the Parquet store (:mod:`appliance.central.store_schema`), streaming.

One event at a time: opened (:func:`appliance.central.received.open_record`: the sender check, then decryption),
flattened (:mod:`appliance.central.flatten`), de-duplicated on (device, ``mid``) and buffered into the row group of
its partition. Memory stays bounded whatever the input: at most ``max_buffered_rows`` rows are held (the largest
buffer is written as a row group when the total passes it), at most ``max_open_writers`` Parquet files are open
(the least recently used is closed; its partition gets a new file if more rows come), and the message ids seen are
an on-disk SQLite index (``STORE/_state/ingest.sqlite``), not a Python set.

A run is all or nothing for the store: its files are written under hidden temporary names and renamed at the end,
then its message ids are committed together with its run id. A crash leaves hidden files (removed by the next run)
or, between the renames and the commit, files of an uncommitted run (also removed by the next run, whose ids are
not recorded either), so re-running on the same input always ends with each message once. Refused events go to
``STORE/_rejects/<run>.jsonl`` with their reason; duplicates (at-least-once delivery) are only counted. One ingest
at a time per store (an exclusive lock on ``_state/lock``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import secrets
import sqlite3
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from appliance.central import store_schema
from appliance.central.flatten import SITE_KEYS, Site, flatten
from appliance.central.received import Refused, open_record
from appliance.central.sources import Item, enqueued_time_of
from appliance.core.logs import get_logger

log = get_logger(__name__)


_OWN_FILE = re.compile(r"^part-(\d{8}T\d{6}Z-[0-9a-f]{6})-\d{5}\.parquet\Z")


class IngestError(Exception):
    """The run cannot start or finish (store of a newer schema, another ingest running, disk): nothing committed."""


@dataclass
class Summary:
    """What a run did: events ``read``; ``accepted`` new messages; ``duplicates`` skipped; ``skipped`` messages of
    types the store does not keep; ``rejected`` (reason -> count) written to ``rejects_file``; ``rows`` per table;
    ``files`` written."""

    run: str
    read: int = 0
    accepted: int = 0
    duplicates: int = 0
    skipped: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(store_schema.TABLES, 0))
    files: int = 0
    rejects_file: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "read": self.read,
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "skipped": self.skipped,
            "rejected": dict(sorted(self.rejected.items())),
            "rows": self.rows,
            "files": self.files,
            "rejects_file": self.rejects_file,
        }


class _Writers:
    """Parquet files per (table, date, bundle) with bounded row groups, open files and buffered rows."""

    def __init__(self, store: Path, run: str, row_group_rows: int, max_buffered_rows: int, max_open_writers: int):
        self.store, self.run = store, run
        self.row_group_rows, self.max_buffered, self.max_open = row_group_rows, max_buffered_rows, max_open_writers
        self.buffers: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        self.buffered = 0
        self.open: OrderedDict[tuple[str, str, str], pq.ParquetWriter] = OrderedDict()
        self.finished: list[Path] = []  # temporary paths of every file of this run
        self._paths: dict[tuple[str, str, str], Path] = {}
        self._seq = 0

    def add(self, table: str, date: str, bundle: str, rows: list[dict[str, Any]]) -> None:
        key = (table, date, bundle)
        buf = self.buffers.setdefault(key, [])
        buf.extend(rows)
        self.buffered += len(rows)
        if len(buf) >= self.row_group_rows:
            self._write(key)
        while self.buffered > self.max_buffered:
            self._write(max(self.buffers, key=lambda k: len(self.buffers[k])))

    def _write(self, key: tuple[str, str, str]) -> None:
        rows = self.buffers.pop(key, [])
        self.buffered -= len(rows)
        if not rows:
            return
        writer = self.open.get(key)
        if writer is None:
            if len(self.open) >= self.max_open:
                old, w = self.open.popitem(last=False)
                w.close()
            self._seq += 1
            directory = store_schema.partition_dir(self.store, *key)
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / f".part-{self.run}-{self._seq:05d}.parquet.tmp"
            writer = pq.ParquetWriter(path, store_schema.TABLES[key[0]], compression="zstd")
            self.open[key] = writer
            self._paths[key] = path
            self.finished.append(path)
        else:
            self.open.move_to_end(key)
        writer.write_table(pa.Table.from_pylist(rows, schema=store_schema.TABLES[key[0]]), row_group_size=len(rows))

    def close(self) -> list[Path]:
        """Write every buffer, close every file; the temporary paths written."""
        for key in list(self.buffers):
            self._write(key)
        for w in self.open.values():
            w.close()
        self.open.clear()
        return self.finished

    def abort(self) -> None:
        for w in self.open.values():
            with contextlib.suppress(Exception):  # cleaning up after a failure already being raised
                w.close()
        self.open.clear()
        for p in self.finished:
            p.unlink(missing_ok=True)


def _final_name(tmp: Path) -> Path:
    return tmp.with_name(tmp.name[1:].removesuffix(".tmp"))


class Ingest:
    """One run into ``store``: feed it :class:`~appliance.central.sources.Item` s, then :meth:`commit`.

    ``keys``: recipient private keys (key id -> base64 X25519); ``sites``: device id -> site dimension (keys
    ``site``, ``region``, ``health_system``, ``setting``; a device not listed gets nulls). Raises
    :class:`IngestError` (and :class:`~appliance.central.store_schema.StoreSchemaError` for a newer store) before
    writing anything. A context manager: leaving without :meth:`commit` rolls the run back."""

    def __init__(
        self,
        store: Path,
        keys: Mapping[str, str],
        sites: Mapping[str, Site] | None = None,
        *,
        row_group_rows: int = 20_000,
        max_buffered_rows: int = 40_000,
        max_open_writers: int = 64,
    ):
        self.store = Path(store)
        store_schema.check_store(self.store, create=True)
        state = self.store / store_schema.STATE_DIR
        state.mkdir(exist_ok=True)
        self._lock_fh: IO[str] | None = open(state / "lock", "a")  # noqa: SIM115 - held for the run
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._lock_fh.close()
            raise IngestError(f"{self.store}: another ingest is running on this store") from exc
        self.keys, self.sites = dict(keys), dict(sites or {})
        self.run = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)
        self.summary = Summary(self.run)
        self.db = sqlite3.connect(state / "ingest.sqlite", isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA cache_size=-16000")  # 16 MB page cache: the id index lives on disk
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS mids (device TEXT NOT NULL, mid TEXT NOT NULL, run TEXT NOT NULL,"
            " PRIMARY KEY (device, mid)) WITHOUT ROWID"
        )
        self.db.execute("CREATE TABLE IF NOT EXISTS runs (run TEXT PRIMARY KEY, finished TEXT NOT NULL, summary TEXT)")
        self._recover()
        self.db.execute("BEGIN IMMEDIATE")
        self._writers = _Writers(self.store, self.run, row_group_rows, max_buffered_rows, max_open_writers)
        self._rejects: IO[str] | None = None
        self._done = False

    def __enter__(self) -> Ingest:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self.rollback()

    def _recover(self) -> None:
        """Remove what a crashed run left: hidden temporary files, and files of runs never committed."""
        committed = {r for (r,) in self.db.execute("SELECT run FROM runs")}
        removed = 0
        for table in store_schema.TABLES:
            for p in (self.store / table).glob("*/*/*"):
                name = p.name
                tmp = name.startswith(".part-") and name.endswith(".tmp")
                m = _OWN_FILE.match(name)  # only this command's files: other engines may write here too
                if tmp or (m is not None and m.group(1) not in committed):
                    p.unlink()
                    removed += 1
        if removed:
            log.warning("ingest.recovered", extra={"files_removed": removed})

    def reject(self, source: str, offset: int, reason: str, detail: str, index: int = 0) -> None:
        """Record one refused event in the run's rejects file."""
        if self._rejects is None:
            rdir = self.store / store_schema.REJECTS_DIR
            rdir.mkdir(exist_ok=True)
            path = rdir / f"{self.run}.jsonl"
            self._rejects = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed at commit/rollback
            self.summary.rejects_file = str(path)
        doc = {"source": source, "offset": offset, "record": index, "reason": reason, "detail": detail[:500]}
        self._rejects.write(json.dumps(doc, sort_keys=True) + "\n")
        self.summary.rejected[reason] = self.summary.rejected.get(reason, 0) + 1

    def feed(self, item: Item) -> None:
        """Take one event (or a read error) into the run."""
        s = self.summary
        if item.error is not None:
            self.reject(item.source, item.offset, item.error[0], item.error[1], item.index)
            return
        s.read += 1
        assert item.record is not None and item.enqueued_time is not None
        opened = open_record(item.record, self.keys)
        try:
            if isinstance(opened, Refused):
                raise opened
            flat = flatten(opened, item.enqueued_time, self.sites.get(opened.device))
        except Refused as exc:
            self.reject(item.source, item.offset, exc.reason, str(exc), item.index)
            return
        if flat is None:
            s.skipped += 1
            return
        cur = self.db.execute(
            "INSERT OR IGNORE INTO mids (device, mid, run) VALUES (?, ?, ?)", (flat.device, flat.mid, self.run)
        )
        if cur.rowcount != 1:
            s.duplicates += 1
            return
        s.accepted += 1
        for table, rows in flat.rows.items():
            if rows:
                self._writers.add(table, flat.date, flat.bundle, rows)
                s.rows[table] += len(rows)

    def feed_all(self, items: Iterable[Item]) -> None:
        for item in items:
            self.feed(item)

    def commit(self) -> Summary:
        """Close the files, publish them (rename) and record the run and its message ids. Raises IngestError."""
        try:
            tmps = self._writers.close()
            for tmp in tmps:
                os.replace(tmp, _final_name(tmp))
            self.summary.files = len(tmps)
            self.db.execute(
                "INSERT INTO runs (run, finished, summary) VALUES (?, ?, ?)",
                (self.run, dt.datetime.now(dt.timezone.utc).isoformat(), json.dumps(self.summary.as_dict())),
            )
            self.db.execute("COMMIT")
        except (OSError, sqlite3.Error) as exc:
            self.rollback()
            raise IngestError(f"could not finish the run: {exc}") from exc
        self._finish()
        log.info("ingest.committed", extra={"run": self.run, "accepted": self.summary.accepted})
        return self.summary

    def rollback(self) -> None:
        """Undo the run: its files removed, its message ids forgotten (the rejects file stays as a record)."""
        if self._done:
            return
        self._writers.abort()
        for tmp in self._writers.finished:
            _final_name(tmp).unlink(missing_ok=True)
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")
        self._finish()

    def _finish(self) -> None:
        self._done = True
        if self._rejects is not None:
            self._rejects.close()
        self.db.close()
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None


def load_sites_csv(path: Path) -> dict[str, dict[str, str | None]]:
    """``--sites sites.csv``: header ``device,site,region,health_system,setting`` (extra columns ignored, empty =
    null). Raises ValueError naming the problem."""
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "device" not in reader.fieldnames:
            raise ValueError(f"{path}: needs a header with a 'device' column and some of {SITE_KEYS}")
        out: dict[str, dict[str, str | None]] = {}
        for row in reader:
            device = (row.get("device") or "").strip()
            if device:
                out[device] = {k: (row.get(k) or "").strip() or None for k in SITE_KEYS}
        return out


def sites_from_twins(twins: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, str | None]]:
    """The site dimension from twin query rows (``deviceId``, ``tags``): tags ``site``, ``region``,
    ``health_system``, ``setting`` taken when they are strings, else null."""
    out: dict[str, dict[str, str | None]] = {}
    for twin in twins:
        device, tags = twin.get("deviceId"), twin.get("tags") or {}
        if isinstance(device, str) and isinstance(tags, Mapping):
            out[device] = {k: tags[k] if isinstance(tags.get(k), str) else None for k in SITE_KEYS}
    return out


def open_and_flatten(
    record: Mapping[str, Any], private_keys: Mapping[str, str], sites: Mapping[str, Site]
) -> list[tuple[str, dict[str, Any]]]:
    """The record-level step of ingest for any engine (``spark_job.OpenRecord``; bind ``private_keys`` and
    ``sites`` with ``functools.partial``): one routed IoT Hub record (``EnqueuedTimeUtc``, ``SystemProperties``,
    ``Body``) -> opened with the sender check (``received.open_record``) -> the store rows it makes, as (table,
    row) pairs (``flatten.flatten``; none for a type the store does not keep). Raises
    :class:`appliance.central.received.Refused` (with ``reason``) for a record it refuses."""
    opened = open_record(record, private_keys)
    if isinstance(opened, Refused):
        raise opened
    flat = flatten(opened, enqueued_time_of(record), sites.get(opened.device))
    return [] if flat is None else [(table, row) for table, rows in flat.rows.items() for row in rows]
