"""Attack 4 on issue 17: hostile input for the central reader and report, and for site operating points.

Each test is an attacker's input that the code before the fix mishandled: a deflate bomb in a routed Avro block
(memory grew with the inflated size), a block declaring millions of tiny records (all held in memory at once),
a store whose Parquet files were replaced by files of other column types or garbage (a DuckDB traceback, or a
silently wrong report), and an operating point the box refuses blocking the rest of the desired document.
"""

from __future__ import annotations

import io
import os
import shutil
import tracemalloc
import zlib
from pathlib import Path

import fastavro
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from appliance.central import sources
from appliance.central.report import ReportError, build_report
from appliance.central.report_engine import DuckDBEngine
from testsupport.central_store import HUB_AVRO_SCHEMA, make_store

pytestmark = pytest.mark.unit


# -- Avro container files with hostile blocks ---------------------------------------------------------------------


def _zigzag(n: int) -> bytes:
    """Avro ``long`` encoding (zig-zag varint), Avro 1.11 specification "Binary Encoding"."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while True:
        b = z & 0x7F
        z >>= 7
        if z:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _record_bytes(rec: dict) -> bytes:
    bio = io.BytesIO()
    fastavro.schemaless_writer(bio, fastavro.parse_schema(HUB_AVRO_SCHEMA), rec)
    return bio.getvalue()


def _rec(body: bytes, mid: str = "m") -> dict:
    return {
        "EnqueuedTimeUtc": "2026-03-02T10:00:00Z",
        "Properties": {"$.mid": mid},
        "SystemProperties": {"connectionDeviceId": "box-1"},
        "Body": body,
    }


def _container(blocks: list[tuple[int, bytes]]) -> bytes:
    """A deflate Avro container file of IoT Hub's schema with these (count, raw deflate data) blocks."""
    head = io.BytesIO()
    fastavro.writer(head, fastavro.parse_schema(HUB_AVRO_SCHEMA), [], codec="deflate")
    data = head.getvalue()
    sync = data[-16:]
    out = bytearray(data)
    for count, block in blocks:
        out += _zigzag(count) + _zigzag(len(block)) + block + sync
    return bytes(out)


def _deflate(chunks) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return b"".join(c.compress(ch) for ch in chunks) + c.flush()


def _peak_while_reading(data: bytes) -> tuple[list[sources.Item], int]:
    tracemalloc.start()
    try:
        items = []
        for it in sources.read_avro(io.BytesIO(data), "bomb.avro"):
            items.append(it if it.error or len(items) < 10 else None)  # keep a few, drop the rest
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return [i for i in items if i is not None], peak


def test_a_deflate_bomb_block_is_refused_without_inflating_it() -> None:
    good = _deflate([_record_bytes(_rec(b"{}", "before"))])
    # one record whose Body inflates to 256 MB from about half a megabyte of deflate data
    bomb_raw_head = _record_bytes(_rec(b"", "bomb"))[:-1]  # all but the empty body's length byte
    body_len = 256 * 1024 * 1024
    bomb = _deflate([bomb_raw_head, _zigzag(body_len), *([bytes(1024 * 1024)] * 256)])
    assert len(bomb) < sources.MAX_BLOCK_BYTES
    after = _deflate([_record_bytes(_rec(b"{}", "after"))])
    items, peak = _peak_while_reading(_container([(1, good), (1, bomb), (1, after)]))
    mids = [i.record["Properties"]["$.mid"] for i in items if i.record is not None]
    errors = [i.error for i in items if i.error]
    assert mids == ["before", "after"]  # the blocks around it are still read
    assert len(errors) == 1 and errors[0][0] == "corrupt_block" and "inflates" in errors[0][1]
    assert peak < 2 * sources.MAX_INFLATED_BLOCK_BYTES + 32 * 1024 * 1024, f"peak {peak / 1e6:.0f} MB"


def test_a_block_of_400k_tiny_records_is_read_one_record_at_a_time() -> None:
    tiny = _record_bytes(_rec(b"", ""))  # a few bytes each
    n = 400_000
    pad = os.urandom(128 * 1024)  # incompressible: the compressed size lets the block declare this many records
    raw = [tiny] * (n - 1) + [_record_bytes(_rec(pad, "last"))]
    block = _deflate(raw)
    items, peak = _peak_while_reading(_container([(n, block)]))
    assert not [i for i in items if i.error]
    assert peak < 64 * 1024 * 1024, f"peak {peak / 1e6:.0f} MB for one block of {n} records"


# -- a store whose Parquet files were replaced --------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("a4store") / "store"
    make_store(root, studies_per_device_day=2)
    return root


def _stringly(t: pa.Table) -> pa.Table:
    cols = {n: pa.array(["x" if v is None else str(v) for v in t.column(n).to_pylist()]) for n in t.column_names}
    return pa.table(cols)


@pytest.mark.parametrize("table", ["results", "findings", "stats", "feedback"])
@pytest.mark.parametrize("damage", ["types", "garbage", "missing_column"])
def test_a_store_file_of_the_wrong_shape_is_refused_by_name(small_store: Path, tmp_path: Path, table, damage) -> None:
    store = tmp_path / "store"
    shutil.copytree(small_store, store)
    victim = sorted((store / table).rglob("*.parquet"))[0]
    t = pq.read_table(victim)
    if damage == "types":
        pq.write_table(_stringly(t), victim)
    elif damage == "garbage":
        victim.write_bytes(b"PAR1" + b"\0" * 64 + b"PAR1")
    else:
        pq.write_table(t.drop([t.column_names[-1]]), victim)
    with pytest.raises(ReportError) as err:
        build_report(DuckDBEngine(), store)
    assert str(victim.relative_to(store)) in str(err.value)

    from appliance.cli import app

    res = CliRunner().invoke(app, ["central", "report", "--store", str(store), "--json"])
    assert res.exit_code == 2, res.output
    assert victim.name in res.output and "Traceback" not in res.output


def test_the_untouched_store_still_reports(small_store: Path) -> None:
    doc = build_report(DuckDBEngine(), small_store)
    assert doc["tables"]["volume"]["rows"]
