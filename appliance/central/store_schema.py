"""The central store's published, versioned schema (version 1): what ``appliance central ingest`` writes and what
``appliance central report`` (DuckDB or Spark) reads.

A store is a folder::

    STORE/_schema.json                                    {"name": "clinicai-store", "version": 1}
    STORE/<table>/date=YYYY-MM-DD/bundle=<id>@<ver>/part-<run>-<n>.parquet
    STORE/_rejects/<run>.jsonl                            {source, offset, reason, detail} per refused record
    STORE/_state/                                         the ingest's own bookkeeping (message ids seen)

``<table>`` is one of :data:`TABLES`; the two partition keys (hive style) are ``date`` (the UTC date of the hub's
``enqueued_time``) and ``bundle`` (``<bundle_id>@<bundle_version>``); they are in the path, not in the files (read
with ``hive_partitioning``). Every timestamp is ``timestamp[us, tz=UTC]``. A reader or writer that finds a higher
``version`` in ``_schema.json`` than :data:`VERSION` must refuse the store (:func:`check_store`): columns may have
changed meaning. Adding a table or a nullable column at the end is a compatible change within a version; renaming,
removing or retyping a column needs a new version.

Needs pyarrow (the ``central`` extra); never imported on the box.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pyarrow as pa

NAME = "clinicai-store"
VERSION = 1
SCHEMA_FILE = "_schema.json"
REJECTS_DIR = "_rejects"
STATE_DIR = "_state"
PARTITION_KEYS = ("date", "bundle")

_TS = pa.timestamp("us", tz="UTC")
_SITE = [
    pa.field("site", pa.string()),
    pa.field("region", pa.string()),
    pa.field("health_system", pa.string()),
    pa.field("setting", pa.string()),  # "urban" | "rural" | null
]

RESULTS = pa.schema(
    [
        pa.field("mid", pa.string(), nullable=False),
        pa.field("device", pa.string(), nullable=False),
        *_SITE,
        pa.field("enqueued_time", _TS, nullable=False),
        pa.field("bundle_id", pa.string()),
        pa.field("bundle_version", pa.string()),
        pa.field("study", pa.string()),  # the box's keyed pseudonym of the Study Instance UID
        pa.field("modality", pa.string()),
        pa.field("task", pa.string()),
        pa.field("study_score", pa.float64()),
        pa.field("urgent", pa.bool_()),
        pa.field("n_images", pa.int32()),
        pa.field("n_refused", pa.int32()),
        pa.field("operating_point_version", pa.int32()),
        pa.field("schema", pa.string()),
    ]
)
"""One row per result message (schema ``result/v1``)."""

FINDINGS = pa.schema(
    [
        pa.field("mid", pa.string(), nullable=False),
        pa.field("device", pa.string(), nullable=False),
        pa.field("site", pa.string()),
        pa.field("enqueued_time", _TS, nullable=False),
        pa.field("bundle_id", pa.string()),
        pa.field("bundle_version", pa.string()),
        pa.field("study", pa.string()),
        pa.field("image", pa.string()),  # pseudonym of the SOP Instance UID
        pa.field("label", pa.string()),
        pa.field("score", pa.float64()),
        pa.field("positive", pa.bool_()),
        pa.field("threshold", pa.float64()),
        pa.field("threshold_source", pa.string()),  # "manifest" | "site" | null (older boxes)
    ]
)
"""One row per finding of a result message."""

STATS = pa.schema(
    [
        pa.field("mid", pa.string(), nullable=False),
        pa.field("device", pa.string(), nullable=False),
        *_SITE,
        pa.field("enqueued_time", _TS, nullable=False),
        pa.field("bundle_id", pa.string()),
        pa.field("bundle_version", pa.string()),
        pa.field("day", pa.date32()),
        pa.field("generated_at", _TS),
        pa.field("metric", pa.string()),
        pa.field("key", pa.string()),
        pa.field("count", pa.int64()),
    ]
)
"""Long form of a ``stats/v1`` message: one row per (metric, key). ``metric``: ``score:<label>``, ``study_score``,
``input_mean``, ``input_p95`` (key = bin index 0..19 as text), ``positives:<label>``, ``count:studies``,
``count:images``, ``count:not_analysed`` (key ""), ``inputs:<name>`` (key = the map key), ``refusals`` (key =
category). Every snapshot is kept; a reader takes the newest ``generated_at`` per (device, bundle_id,
bundle_version, day)."""

FEEDBACK = pa.schema(
    [
        pa.field("mid", pa.string(), nullable=False),
        pa.field("device", pa.string(), nullable=False),
        pa.field("site", pa.string()),
        pa.field("enqueued_time", _TS, nullable=False),
        pa.field("bundle_id", pa.string()),
        pa.field("bundle_version", pa.string()),
        pa.field("result_mid", pa.string()),
        pa.field("study", pa.string()),
        pa.field("kind", pa.string()),  # "finding" | "outcome"
        pa.field("label", pa.string()),
        pa.field("verdict", pa.string()),  # "agree" | "disagree" | "uncertain" | null
        pa.field("outcome_code", pa.string()),
        pa.field("outcome_positive", pa.bool_()),
    ]
)
"""One row per ``feedback/v1`` message."""

TABLES: dict[str, pa.Schema] = {"results": RESULTS, "findings": FINDINGS, "stats": STATS, "feedback": FEEDBACK}

_PART = re.compile(r"^[A-Za-z0-9._+-]{1,64}\Z")


class StoreSchemaError(Exception):
    """The folder is not a store this code may read or write (newer version, another kind of folder, unreadable)."""


def bundle_key(bundle_id: str, bundle_version: str) -> str:
    """The ``bundle`` partition value ``<bundle_id>@<bundle_version>``. Raises ValueError unless both match
    ``[A-Za-z0-9._+-]{1,64}`` (the box's de-identification allowlist; keeps paths inside the store)."""
    for part in (bundle_id, bundle_version):
        if not isinstance(part, str) or not _PART.match(part) or part in (".", ".."):
            raise ValueError(f"bundle id/version {str(part)[:80]!r} is not [A-Za-z0-9._+-]{{1,64}}")
    return f"{bundle_id}@{bundle_version}"


def partition_dir(store: Path, table: str, date_iso: str, bundle: str) -> Path:
    """``STORE/<table>/date=<YYYY-MM-DD>/bundle=<bundle>`` (``bundle`` from :func:`bundle_key`)."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}")
    return Path(store) / table / f"date={date_iso}" / f"bundle={bundle}"


def table_glob(store: Path, table: str) -> str:
    """The glob of a table's files, for ``read_parquet(..., hive_partitioning=true)`` (DuckDB) or Spark."""
    return str(Path(store) / table / "*" / "*" / "*.parquet")


def check_table_files(store: Path, table: str) -> list[Path]:
    """Every Parquet file of ``table`` under ``store``, each checked against the published schema
    (:data:`TABLES`) by its footer alone: every published column present with the published Arrow type (more
    columns are allowed). Raises :class:`StoreSchemaError` naming the first file (relative to ``store``) that is
    not Parquet, lacks a column or holds one of another type: a store file replaced or damaged by hand is
    refused by name instead of failing a query later or silently reading NULLs."""
    import pyarrow.parquet as pq

    expected = TABLES[table]
    files = sorted((Path(store) / table).rglob("*.parquet"))
    for f in files:
        name = f.relative_to(store)
        try:
            got = pq.read_schema(f)
        except (OSError, pa.ArrowException) as exc:
            raise StoreSchemaError(f"{name}: not a readable Parquet file ({str(exc)[:200]})") from exc
        for fld in expected:
            idx = got.get_field_index(fld.name)
            if idx < 0:
                raise StoreSchemaError(f"{name}: no column {fld.name!r} ({table} schema v{VERSION})")
            if not got.field(idx).type.equals(fld.type):
                have = got.field(idx).type
                raise StoreSchemaError(f"{name}: column {fld.name!r} is {have}; {table} schema v{VERSION}: {fld.type}")
    return files


def read_version(store: Path) -> int | None:
    """The store's version, None when the folder holds no ``_schema.json`` yet. Raises :class:`StoreSchemaError`
    when the file is not this kind of store's."""
    path = Path(store) / SCHEMA_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StoreSchemaError(f"{path}: unreadable: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("name") != NAME or not isinstance(doc.get("version"), int):
        raise StoreSchemaError(f"{path}: not a {NAME} store (expected {{'name': {NAME!r}, 'version': int}})")
    return int(doc["version"])


def check_store(store: Path, *, create: bool = False) -> None:
    """Refuse a store this code cannot handle; with ``create``, make a new store's folder and ``_schema.json``.

    Raises :class:`StoreSchemaError`: written by a newer schema (version above :data:`VERSION`), not a store,
    or (without ``create``) no store there. Writes nothing when it raises.
    """
    store = Path(store)
    version = read_version(store)
    if version is None:
        if not create:
            raise StoreSchemaError(f"{store}: no {SCHEMA_FILE}: not a {NAME} store (run `appliance central ingest`)")
        if store.exists() and any(p.name in TABLES for p in store.iterdir()):
            raise StoreSchemaError(f"{store}: holds tables but no {SCHEMA_FILE}: refusing to guess its version")
        store.mkdir(parents=True, exist_ok=True)
        tmp = store / f".{SCHEMA_FILE}.tmp"
        tmp.write_text(json.dumps({"name": NAME, "version": VERSION}) + "\n")
        os.replace(tmp, store / SCHEMA_FILE)
        return
    if version > VERSION:
        raise StoreSchemaError(
            f"{store}: written by store schema version {version}; this software reads and writes version {VERSION}:"
            " upgrade it (nothing was written)"
        )
