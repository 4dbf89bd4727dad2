"""The engines the central report's SQL (:mod:`appliance.central.report_sql`) runs on.

An engine registers the store's Parquet tables and a few small constant tables, defines views, and runs a query to
plain Python rows. :class:`DuckDBEngine` (in-process, the default: a laptop reads a year of a fleet's results) is
here; the Spark one (:class:`appliance.central.spark_job.SparkEngine`) has the same methods. Both read the table
folders recursively as plain Parquet (no hive partition columns: every column the report needs is in the files,
so both engines see the same columns) and run in UTC.
"""

from __future__ import annotations

import datetime as dt
import decimal
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from appliance.central import report_sql

Row = dict[str, Any]


class Engine(Protocol):
    """What the report needs from a SQL engine."""

    name: str

    def register_parquet(self, name: str, folder: Path) -> None:
        """View ``name`` over every ``*.parquet`` file under ``folder`` (recursively, union by column name)."""

    def register_rows(self, name: str, columns: list[tuple[str, str]], rows: Sequence[Sequence[Any]]) -> None:
        """View ``name`` of these rows; ``columns`` = [(name, SQL type: STRING, DOUBLE, INT, BIGINT, BOOLEAN,
        DATE, TIMESTAMP)]."""

    def create_view(self, name: str, sql: str) -> None:
        """Temporary view ``name`` AS ``sql`` (already in this engine's dialect)."""

    def query(self, sql: str) -> list[Row]:
        """Rows of ``sql`` as dicts, values normalised by :func:`plain`."""


def plain(value: Any) -> Any:
    """A database value as plain JSON-able Python: dates as ``YYYY-MM-DD``, timestamps as ISO 8601 UTC, decimals
    as float; others unchanged."""
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    return value


_ARROW_TYPES = {
    "STRING": "string",
    "DOUBLE": "float64",
    "INT": "int32",
    "BIGINT": "int64",
    "BOOLEAN": "bool_",
    "DATE": "date32",
}


class DuckDBEngine:
    """DuckDB in this process (an in-memory database; the Parquet files are read where they lie).

    ``threads``/``memory_limit`` are passed to DuckDB's settings of the same names when given."""

    name = "duckdb"

    def __init__(self, *, threads: int | None = None, memory_limit: str | None = None):
        import duckdb

        self._con = duckdb.connect(":memory:")
        self._con.execute("SET TimeZone = 'UTC'")
        if threads:
            self._con.execute(f"SET threads = {int(threads)}")
        if memory_limit:
            self._con.execute(f"SET memory_limit = '{memory_limit.replace(chr(39), '')}'")
        self._keep: list[Any] = []  # Arrow tables registered as views must outlive the view

    def register_parquet(self, name: str, folder: Path) -> None:
        pattern = str(Path(folder) / "**" / "*.parquet").replace("'", "''")
        self._con.execute(
            f"CREATE OR REPLACE TEMP VIEW {name} AS SELECT * FROM "
            f"read_parquet('{pattern}', hive_partitioning = false, union_by_name = true)"
        )

    def register_rows(self, name: str, columns: list[tuple[str, str]], rows: Sequence[Sequence[Any]]) -> None:
        import pyarrow as pa

        fields = []
        for col, typ in columns:
            arrow_type = pa.timestamp("us", tz="UTC") if typ == "TIMESTAMP" else getattr(pa, _ARROW_TYPES[typ])()
            fields.append(pa.field(col, arrow_type))
        table = pa.Table.from_pylist(
            [dict(zip([c for c, _ in columns], r, strict=True)) for r in rows], pa.schema(fields)
        )
        self._keep.append(table)
        self._con.register(f"_{name}_arrow", table)
        self._con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS SELECT * FROM _{name}_arrow")

    def create_view(self, name: str, sql: str) -> None:
        self._con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS {sql}")

    def query(self, sql: str) -> list[Row]:
        cur = self._con.execute(sql)
        names = [d[0] for d in cur.description]
        return [{k: plain(v) for k, v in zip(names, row, strict=True)} for row in cur.fetchall()]

    def close(self) -> None:
        """Close the connection."""
        self._con.close()


def dialect(engine: Engine, sql: str) -> str:
    """``sql`` adapted to ``engine`` (:func:`appliance.central.report_sql.for_engine`)."""
    return report_sql.for_engine(sql, engine.name)
