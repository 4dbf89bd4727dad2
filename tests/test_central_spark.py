"""The same job on Spark (PySpark local[2], one session for the module): the report's tables equal DuckDB's on the
same store (counts exactly, other numbers within 1e-9), and the ingest stage as mapPartitions over IoT Hub Avro
files writes a store the report reads, de-duplicated, with rejects, adding nothing when re-run."""

from __future__ import annotations

import datetime as dt
import functools
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from appliance.central.report import Filters, ReportError, build_report, parse_reference
from appliance.central.report_engine import DuckDBEngine
from testsupport.central_store import (
    BUNDLE,
    SCHEMAS,
    hub_record,
    make_store,
    sealed_result,
    write_avro,
    write_schema_marker,
)

pytestmark = pytest.mark.integration
EDGES = [round(i * 0.05, 2) for i in range(21)]


@pytest.fixture(scope="module")
def spark():
    if shutil.which("java") is None:
        pytest.skip("no Java runtime (Debian openjdk-17-jre-headless)")
    pytest.importorskip("pyspark")
    from appliance.central.spark_job import new_session

    session = new_session("local[2]")
    try:
        yield session
    finally:
        session.stop()


def duck_report(store: Path, filters: Filters = Filters(), refs=()):
    engine = DuckDBEngine()
    try:
        return build_report(engine, store, filters, list(refs))
    finally:
        engine.close()


def assert_same_tables(a: dict, b: dict) -> None:
    assert list(a["tables"]) == list(b["tables"])
    for name in a["tables"]:
        ta, tb = a["tables"][name], b["tables"][name]
        assert ta["columns"] == tb["columns"], name
        assert len(ta["rows"]) == len(tb["rows"]), name
        for ra, rb in zip(ta["rows"], tb["rows"], strict=True):
            for col in ta["columns"]:
                va, vb = ra[col], rb[col]
                if isinstance(va, float) or isinstance(vb, float):
                    assert va is not None and vb is not None, (name, col, ra, rb)
                    assert va == pytest.approx(vb, abs=1e-9, rel=0), (name, col, ra, rb)
                else:
                    assert va == vb and type(va) is type(vb), (name, col, ra, rb)


def test_spark_report_equals_duckdb(spark, tmp_path):
    from appliance.central.spark_job import SparkEngine

    fx = make_store(tmp_path / "store", studies_per_device_day=6)
    ref = parse_reference(
        *BUNDLE, {"n": 100, "score_edges": EDGES, "scores": {"nodule": [5] * 20, "effusion": list(range(20))}},
        None, "t",
    )  # fmt: skip
    spark_report = build_report(SparkEngine(spark), fx.root, Filters(), [ref])
    duck = duck_report(fx.root, Filters(), [ref])
    assert spark_report["engine"] == "spark" and duck["engine"] == "duckdb"
    assert all(duck["tables"][t]["rows"] for t in duck["tables"])
    assert_same_tables(duck, spark_report)
    # and with filters (site + dates) the two still agree
    f = Filters(site="south", since=dt.date(2025, 1, 8), until=dt.date(2025, 1, 20))
    assert_same_tables(duck_report(fx.root, f, [ref]), build_report(SparkEngine(spark), fx.root, f, [ref]))
    # an empty store on Spark: empty tables, same columns
    empty = tmp_path / "empty"
    write_schema_marker(empty)
    assert_same_tables(duck_report(empty), build_report(SparkEngine(spark), empty, Filters(), []))


def test_spark_ingest_of_hub_avro(spark, tmp_path):
    from appliance.central.spark_job import ingest_avro
    from appliance.cloud import crypto

    priv, pub = crypto.generate_keypair()
    recipients, keys = {"central-1": pub}, {"central-1": priv}
    tags = {"box-a": {"site": "north", "setting": "rural"}, "box-b": {"site": "south", "setting": "urban"}}
    t0 = dt.datetime(2025, 1, 6, 9, tzinfo=dt.timezone.utc)

    def rec(device, mid, k, *, sender=None):
        body = sealed_result(recipients, device, mid, f"p-{mid}", {"nodule": 0.1 * k, "effusion": 0.05 * k})
        return hub_record(sender or device, body, t0 + dt.timedelta(hours=k))

    first = [rec("box-a", f"a{k}", k) for k in range(1, 4)]
    (tmp_path / "in").mkdir()
    write_avro(tmp_path / "in" / "00.avro", first)
    write_avro(
        tmp_path / "in" / "01.avro",
        [
            rec("box-b", "b1", 4),
            rec("box-b", "b2", 30),  # the next day (another date partition)
            {**first[1], "EnqueuedTimeUtc": (t0 + dt.timedelta(hours=5)).isoformat()},  # replayed delivery
            rec("box-a", "x1", 6, sender="box-b"),  # the envelope names another device than the hub's sender
            hub_record("box-b", b"not an envelope", t0),
        ],
    )
    (tmp_path / "in" / "02.avro").write_bytes(b"Obj\x01 truncated")  # a corrupt Avro file
    files = sorted((tmp_path / "in").glob("*.avro"))
    store = tmp_path / "store"
    from appliance.central.ingest import open_and_flatten

    open_record = functools.partial(open_and_flatten, private_keys=keys, sites=tags)

    counts = ingest_avro(spark, files, open_record, store, SCHEMAS, run="run1")
    assert counts["records"] == 6 and counts["messages"] == 5
    assert counts["results"] == 5 and counts["findings"] == 10 and counts["rejects"] == 3
    rejects = [json.loads(line) for line in (store / "_rejects" / "run1.jsonl").read_text().splitlines()]
    assert Counter(r["reason"] for r in rejects) == Counter({"sender_mismatch": 1, "malformed": 1, "corrupt_file": 1})
    assert {Path(r["source"]).name for r in rejects} == {"01.avro", "02.avro"}
    assert sorted(p.name for p in (store / "results").iterdir() if p.is_dir()) == ["date=2025-01-06", "date=2025-01-07"]
    assert (store / "results" / "date=2025-01-06" / f"bundle={BUNDLE[0]}@{BUNDLE[1]}").is_dir()

    # the Parquet Spark wrote is the store's: pyarrow reads the contract's types, DuckDB's report reads it
    import pyarrow.dataset as ds

    table = ds.dataset(store / "results", format="parquet", partitioning="hive").to_table()
    assert str(table.schema.field("enqueued_time").type) == "timestamp[us, tz=UTC]"
    assert sorted(table.column("mid").to_pylist()) == ["a1", "a2", "a3", "b1", "b2"]
    # the replayed delivery kept the first enqueued time
    a2 = table.filter(ds.field("mid") == "a2").column("enqueued_time").to_pylist()[0]
    assert a2 == t0 + dt.timedelta(hours=2)
    rep = duck_report(store)
    assert {(r["site"], r["studies"]) for r in rep["tables"]["volume"]["rows"]} == {("north", 3), ("south", 2)}
    south = [r for r in rep["tables"]["labels"]["rows"] if r["site"] == "south" and r["label"] == "nodule"][0]
    assert south["score_p50"] == pytest.approx((0.4 + 3.0) / 2)

    # re-running on the same input adds nothing (the rejects are reported again, in the new run's file)
    again = ingest_avro(spark, files, open_record, store, SCHEMAS, run="run2")
    assert again["results"] == 0 and again["findings"] == 0 and again["rejects"] == 3
    assert ds.dataset(store / "results", format="parquet").count_rows() == 5

    # a store of a newer schema is refused before anything is written
    newer = tmp_path / "newer"
    write_schema_marker(newer, version=2)
    with pytest.raises(ReportError, match="version 2"):
        ingest_avro(spark, files, open_record, newer, SCHEMAS, run="x")
    assert not (newer / "results").exists()
