"""Spark at fleet scale: the report's SQL on Spark SQL, and the ingest stage as ``mapPartitions`` over the hub's
Avro files. Needs the ``spark`` extra (pyspark) and Java 17; imported only by the central commands and tests: the
box never imports pyspark (every pyspark import below is inside a function).

- :class:`SparkEngine` runs :mod:`appliance.central.report_sql` unchanged (the one SQL text; dialect differences
  are in :data:`appliance.central.report_sql.DIALECT`), so :func:`appliance.central.report.build_report` gives
  the same tables on Spark as on DuckDB.
- :func:`ingest_avro` reads IoT Hub routing Avro files (``EnqueuedTimeUtc``, ``Properties``, ``SystemProperties``,
  ``Body``) in Spark tasks, one file at a time and one record at a time (fastavro streaming; constant memory per
  task), hands each record to the per-record open/flatten function it is given (:data:`OpenRecord`: the same
  library function the one-machine ``central ingest`` calls), de-duplicates on the message id across the whole
  input and against what the store already holds, and appends Parquet to the store in its layout
  (``<table>/date=YYYY-MM-DD/bundle=<bundle_id>@<bundle_version>/``). Refused records go to
  ``STORE/_rejects/<run>.jsonl`` with their reason.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from appliance.central import store_schema
from appliance.central.report_engine import Row, plain

# The per-record step of ingest, called inside Spark tasks: one Avro record of IoT Hub's routing format, as
# fastavro yields it ({"EnqueuedTimeUtc": str, "Properties": {str: str}, "SystemProperties": {str: str},
# "Body": bytes}), -> the store rows it makes: [(table, row)], ``table`` one of "results", "findings", "stats",
# "feedback" and ``row`` a dict of that table's columns (``mid`` and ``enqueued_time`` (an aware datetime) set,
# ``bundle_id``/``bundle_version`` set). Every row of one record carries the record's message ``mid``. It raises
# for a record it refuses; the exception's ``reason`` attribute (else its class name) and message become the
# reject. It must be picklable (a module-level function or a functools.partial of one, with the private keys and
# the site dimension bound), because Spark ships it to its Python workers. The one-machine ingest's record-level
# functions fit it as: open the record (``received.open_record``; a returned Refused is raised), flatten it with the
# record's enqueued time and the device's site, and list the flattened rows as (table, row) pairs.
OpenRecord = Callable[[Mapping[str, Any]], list[tuple[str, dict[str, Any]]]]


class SparkEngine:
    """The report's engine on a Spark session (:class:`appliance.central.report_engine.Engine`)."""

    name = "spark"

    def __init__(self, spark: Any):
        self.spark = spark

    @classmethod
    @contextlib.contextmanager
    def session(cls, master: str = "local[2]", **conf: str) -> Iterator[SparkEngine]:
        """A new Spark session (UTC, no UI), stopped on exit; ``conf``: further Spark settings."""
        spark = new_session(master, **conf)
        try:
            yield cls(spark)
        finally:
            spark.stop()

    def register_parquet(self, name: str, folder: Path) -> None:
        df = self.spark.read.option("recursiveFileLookup", "true").option("mergeSchema", "true").parquet(str(folder))
        df.createOrReplaceTempView(name)

    def register_rows(self, name: str, columns: list[tuple[str, str]], rows: Sequence[Sequence[Any]]) -> None:
        schema = ", ".join(f"{col} {typ}" for col, typ in columns)
        self.spark.createDataFrame([tuple(r) for r in rows], schema).createOrReplaceTempView(name)

    def create_view(self, name: str, sql: str) -> None:
        self.spark.sql(f"CREATE OR REPLACE TEMP VIEW {name} AS {sql}")

    def query(self, sql: str) -> list[Row]:
        return [{k: plain(v) for k, v in r.asDict().items()} for r in self.spark.sql(sql).collect()]


def new_session(master: str = "local[2]", **conf: str) -> Any:
    """A Spark session set up as the report and ingest expect: session time zone UTC (dates and ISO weeks are
    UTC's), Parquet timestamps written as TIMESTAMP_MICROS (what pyarrow and DuckDB read as UTC instants), no
    web UI; Python workers run this interpreter (``sys.executable``: the same packages as the driver). Raises
    whatever pyspark raises when Java or pyspark is missing."""
    from pyspark.sql import SparkSession

    # pyspark starts its Python workers with $PYSPARK_PYTHON (default: whatever "python3" is on PATH)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

    builder = (
        SparkSession.builder.master(master)
        .appName("clinicai-central")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "4")
    )
    for key, value in conf.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def _open_file(path: str, open_record: OpenRecord) -> Iterator[tuple[str, Any]]:
    """("msg", (mid, enqueued ISO, rows)) or ("reject", {...}) for each record of one file, streamed by the
    one-machine ingest's reader (``sources.read_file``: a corrupt Avro block is one reject and reading resumes at
    the next sync marker)."""
    from appliance.central.sources import read_file

    for item in read_file(Path(path), path):
        if item.error is not None or item.record is None:
            reason, detail = item.error or ("malformed", "no record")
            yield "reject", {"source": path, "offset": item.offset, "reason": reason, "detail": detail[:500]}
            continue
        try:
            rows = open_record(item.record)
        except Exception as exc:  # the record's fault: report it, read on
            reason = getattr(exc, "reason", type(exc).__name__)
            yield "reject", {"source": path, "offset": item.offset, "reason": reason, "detail": str(exc)[:500]}
            continue
        if rows:
            first = min(r["enqueued_time"] for _, r in rows)
            yield "msg", (rows[0][1]["mid"], first.isoformat(), rows)


def _earliest(a: tuple[str, list], b: tuple[str, list]) -> tuple[str, list]:
    """Of two deliveries of one message, the first enqueued (the rows' content is the same: one envelope)."""
    return a if a[0] <= b[0] else b


def ingest_avro(
    spark: Any,
    avro_files: Iterable[str | Path],
    open_record: OpenRecord,
    store: Path,
    schemas: Mapping[str, Any],
    *,
    run: str | None = None,
) -> dict[str, int]:
    """Ingest IoT Hub routing Avro files into ``store`` on ``spark`` (module docstring).

    ``schemas``: table -> the store's pyarrow schema of that table (the published store schema); the Parquet
    written has exactly those columns, less the partition columns (``date``: UTC date of ``enqueued_time``;
    ``bundle``: ``<bundle_id>@<bundle_version>``), which are folders. ``run`` names the rejects file (default: a
    UTC timestamp and a random suffix; no file when nothing was refused). Re-running on the same input adds
    nothing: a message id already in the store's table is skipped. Returns counts: ``records`` (accepted
    deliveries), ``messages`` (distinct message ids among them), ``rejects`` and the rows written per table.
    Raises :class:`appliance.central.report.ReportError` for a store of a newer schema."""
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema

    from appliance.central.report import ReportError

    store = Path(store)
    try:  # a store of a newer schema is refused before anything is written
        store_schema.check_store(store, create=True)
    except store_schema.StoreSchemaError as exc:
        raise ReportError(str(exc)) from exc
    files = [str(Path(p)) for p in avro_files]
    run = run or dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:8]
    sc = spark.sparkContext
    opened = sc.parallelize(files, max(1, min(len(files), sc.defaultParallelism * 4))).mapPartitions(
        lambda paths: (item for p in paths for item in _open_file(p, open_record))
    )
    opened = opened.cache()
    counts: dict[str, int] = {"records": 0, "messages": 0, "rejects": 0}
    rejects_dir = store / "_rejects"
    rejects_dir.mkdir(parents=True, exist_ok=True)
    rejects_file = rejects_dir / f"{run}.jsonl"
    with open(rejects_file, "w", encoding="utf-8") as out:
        for _, reject in opened.filter(lambda kv: kv[0] == "reject").toLocalIterator():
            out.write(json.dumps(reject, sort_keys=True) + "\n")
            counts["rejects"] += 1
    if not counts["rejects"]:
        rejects_file.unlink()
    msgs = opened.filter(lambda kv: kv[0] == "msg").map(lambda kv: (kv[1][0], (kv[1][1], kv[1][2])))
    counts["records"] = msgs.count()
    unique = msgs.reduceByKey(_earliest).cache()
    for table in store_schema.TABLES:
        if table not in schemas:
            continue
        arrow_schema = schemas[table]
        names = list(arrow_schema.names)
        rows = unique.flatMap(
            lambda kv, t=table, cols=names: [tuple(r.get(c) for c in cols) for tb, r in kv[1][1] if tb == t]
        )
        df = spark.createDataFrame(rows, from_arrow_schema(arrow_schema))
        existing = store / table
        if existing.is_dir() and next(existing.rglob("*.parquet"), None) is not None:
            known = spark.read.option("recursiveFileLookup", "true").parquet(str(existing)).select("mid").distinct()
            df = df.join(known, on="mid", how="left_anti")
        df = df.withColumn("date", F.date_format(F.col("enqueued_time"), "yyyy-MM-dd")).withColumn(
            "bundle", F.concat_ws("@", F.col("bundle_id"), F.col("bundle_version"))
        )
        df = df.cache()
        n = df.count()
        counts[table] = n
        if n:
            df.write.mode("append").partitionBy("date", "bundle").parquet(str(existing))
        df.unpersist()
    counts["messages"] = unique.count()
    unique.unpersist()
    opened.unpersist()
    return counts
