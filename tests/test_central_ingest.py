"""`appliance central ingest` in process: routed Avro files and JSON-lines exports -> the Parquet store, read back
with DuckDB. Messages are sealed with the product's own envelope code; files are written by the fake hub's
storage endpoint. Bad input: corrupt/truncated Avro, forged sender, replays, unknown schema, a newer store, garbage."""

from __future__ import annotations

import base64
import calendar
import datetime as dt
import io
import json
from pathlib import Path

import duckdb
import fastavro
import pytest
from typer.testing import CliRunner

from appliance.central import received, sources, store_schema
from appliance.central.ingest import Ingest
from appliance.cli import app
from appliance.cloud import crypto, deid, payload
from appliance.core.config import Settings
from testsupport.central import (
    feedback_plaintext,
    result_plaintext,
    routed,
    seal,
    stats_plaintext,
    write_routed,
)
from testsupport.cloud import sample_result
from testsupport.fakehub.routing import StorageEndpoint, dotnet_utc, folder_sink

T0 = calendar.timegm((2026, 3, 1, 10, 0, 0)) + 0.25  # 2026-03-01T10:00:00.25Z


@pytest.fixture
def keys() -> dict[str, str]:
    priv, pub = crypto.generate_keypair()
    return {"priv": priv, "pub": pub}


@pytest.fixture
def keyfile(tmp_path: Path, keys) -> Path:
    p = tmp_path / "central-1.key"
    p.write_text(keys["priv"] + "\n")
    return p


def _results(n: int, pub: str, device: str = "box-1", start: int = 0, t0: float = T0) -> list[dict]:
    return [
        routed(
            device,
            "result",
            f"mid-{i}",
            seal("result", "result/v1", f"mid-{i}", device, result_plaintext(i), pub),
            t0 + i,
        )
        for i in range(start, start + n)
    ]


def _ingest(src: Path, store: Path, keys: dict, sites=None):
    with Ingest(store, {"central-1": keys["priv"]}, sites) as run:
        run.feed_all(sources.read_path(src))
        return run.commit()


def _q(store: Path, table: str, sql: str) -> list[tuple]:
    glob = store_schema.table_glob(store, table)
    return duckdb.sql(sql.replace("{T}", f"read_parquet('{glob}', hive_partitioning=true)")).fetchall()


def _rejects(summary) -> list[dict]:
    return [json.loads(x) for x in Path(summary.rejects_file).read_text().splitlines()] if summary.rejects_file else []


def test_results_from_the_product_message_path_land_in_parquet(tmp_path: Path, keys) -> None:
    # the box's own builder (de-identification + envelope) for two results, plus contract-shaped results
    settings = Settings(state_dir=tmp_path / "home", cloud={"device_id": "box-1"})
    secret = b"s" * 32
    recs = []
    for i in (1, 2):
        mid, body = payload.build_result_message(
            sample_result(i), settings, secret, recipient_keys={"central-1": keys["pub"]}
        )
        recs.append(routed("box-1", "result", mid, body, T0 + i))
    recs += _results(3, keys["pub"], start=10)
    write_routed(tmp_path / "in", recs, iothub="hub1")
    sites = {"box-1": {"site": "kisumu", "region": "west", "health_system": "moh", "setting": "rural"}}
    s = _ingest(tmp_path / "in", tmp_path / "store", keys, sites)
    assert (s.accepted, s.duplicates, s.rejected) == (5, 0, {})
    assert s.rows["results"] == 5 and s.rows["findings"] == 2 * 2 + 3
    store = tmp_path / "store"
    assert json.loads((store / "_schema.json").read_text()) == {"name": "clinicai-store", "version": 1}
    rows = _q(
        store,
        "results",
        "SELECT mid, study, modality, bundle, date, site, setting, enqueued_time FROM {T} ORDER BY enqueued_time",
    )
    want_study = deid.pseudonym_uid(secret, sample_result(1)["study_uid"])
    assert rows[0][1] == want_study and rows[0][2] == "MG" and rows[0][3] == "ref-mmg@1.0.0"
    assert str(rows[0][4]) == "2026-03-01" and rows[0][5:7] == ("kisumu", "rural")
    assert rows[0][7] == dt.datetime(2026, 3, 1, 10, 0, 1, 250000, tzinfo=dt.timezone.utc)
    # issue-17 fields of a contract result flattened as the contract says
    r = _q(
        store,
        "results",
        "SELECT urgent, n_images, n_refused, operating_point_version, study_score FROM {T} WHERE mid='mid-10'",
    )
    assert r == [(True, 1, 0, None, 0.1)]
    r = _q(store, "results", "SELECT n_refused, operating_point_version FROM {T} WHERE mid='mid-11'")
    assert r == [(0, 3)]
    f = _q(
        store,
        "findings",
        "SELECT image, label, score, positive, threshold, threshold_source FROM {T} WHERE mid='mid-11'",
    )
    assert f == [("2.25.511", "tb", 0.11, False, 0.5, "site")]
    types = dict(
        duckdb.sql(f"DESCRIBE SELECT * FROM read_parquet('{store_schema.table_glob(store, 'results')}')").fetchall()[i][
            :2
        ]
        for i in range(17)
    )
    assert types["enqueued_time"] == "TIMESTAMP WITH TIME ZONE" and types["n_images"] == "INTEGER"


def test_stats_and_feedback_flatten_per_the_contract(tmp_path: Path, keys) -> None:
    pub = keys["pub"]
    recs = [
        routed("box-1", "stats", "st-1", seal("stats", "stats/v1", "st-1", "box-1", stats_plaintext(), pub), T0),
        routed(
            "box-1",
            "feedback",
            "fb-1",
            seal("feedback", "feedback/v1", "fb-1", "box-1", feedback_plaintext("mid-1"), pub),
            T0,
        ),
        routed(
            "box-1",
            "feedback",
            "fb-2",
            seal("feedback", "feedback/v1", "fb-2", "box-1", feedback_plaintext("mid-1", "outcome"), pub),
            T0,
        ),
        routed("box-1", "audit", "au-1", seal("audit", "audit/v1", "au-1", "box-1", {"event": "x"}, pub), T0),
    ]
    write_routed(tmp_path / "in", recs)
    s = _ingest(tmp_path / "in", tmp_path / "store", keys)
    assert (s.accepted, s.skipped, s.rejected) == (3, 1, {})
    st = dict(((m, k), c) for m, k, c in _q(tmp_path / "store", "stats", "SELECT metric, key, count FROM {T}"))
    assert st[("score:tb", "3")] == 7 and st[("score:tb", "12")] == 3 and st[("score:tb", "0")] == 0
    assert st[("count:studies", "")] == 10 and st[("count:not_analysed", "")] == 1
    assert st[("positives:tb", "")] == 3 and st[("refusals", "wrong_body_part")] == 1
    assert st[("inputs:manufacturer_model", "ACME|X1")] == 12 and st[("input_p95", "12")] == 3
    day = _q(tmp_path / "store", "stats", "SELECT DISTINCT day, generated_at FROM {T}")
    assert day == [(dt.date(2026, 3, 1), dt.datetime(2026, 3, 1, 23, tzinfo=dt.timezone.utc))]
    fb = _q(
        tmp_path / "store",
        "feedback",
        "SELECT mid, kind, label, verdict, outcome_code, outcome_positive, result_mid FROM {T} ORDER BY mid",
    )
    assert fb == [
        ("fb-1", "finding", "tb", "agree", None, None, "mid-1"),
        ("fb-2", "outcome", None, None, "genexpert_positive", True, "mid-1"),
    ]


def test_replays_add_nothing_within_a_run_and_across_runs(tmp_path: Path, keys) -> None:
    recs = _results(4, keys["pub"])
    write_routed(tmp_path / "in", recs + recs[:2])  # at-least-once: two delivered twice
    s1 = _ingest(tmp_path / "in", tmp_path / "store", keys)
    assert (s1.accepted, s1.duplicates) == (4, 2)
    files = sorted(p.name for p in (tmp_path / "store").rglob("*.parquet"))
    s2 = _ingest(tmp_path / "in", tmp_path / "store", keys)
    assert (s2.accepted, s2.duplicates, s2.files) == (0, 6, 0)
    assert sorted(p.name for p in (tmp_path / "store").rglob("*.parquet")) == files
    assert _q(tmp_path / "store", "results", "SELECT count(*), count(DISTINCT mid) FROM {T}") == [(4, 4)]


def test_forged_sender_unknown_schema_and_garbage_are_rejected_with_reasons(tmp_path: Path, keys) -> None:
    pub = keys["pub"]
    forged = routed("box-1", "result", "f-1", seal("result", "result/v1", "f-1", "box-2", result_plaintext(1), pub), T0)
    v2 = routed("box-1", "result", "v2-1", seal("result", "result/v2", "v2-1", "box-1", result_plaintext(2), pub), T0)
    garbage = routed("box-1", "result", "g-1", b"\x00\xffnot an envelope", T0)
    bad_json = routed("box-1", "result", "g-2", b'{"meta": {"device": "box-1"}, "ct": 1}', T0)
    nan = stats_plaintext()
    nan["studies"] = float("nan")
    nan_stats = routed("box-1", "stats", "n-1", seal("stats", "stats/v1", "n-1", "box-1", nan, pub), T0)
    neg = stats_plaintext()
    neg["scores"]["tb"] = [-1] * 20
    neg_stats = routed("box-1", "stats", "n-2", seal("stats", "stats/v1", "n-2", "box-1", neg, pub), T0)
    short = stats_plaintext()
    short["input_mean"] = [1] * 19
    short_stats = routed("box-1", "stats", "n-3", seal("stats", "stats/v1", "n-3", "box-1", short, pub), T0)
    evil = result_plaintext(3, bundle=("../../etc", "1"))
    evil_bundle = routed("box-1", "result", "e-1", seal("result", "result/v1", "e-1", "box-1", evil, pub), T0)
    other_key = routed(
        "box-1",
        "result",
        "k-1",
        seal("result", "result/v1", "k-1", "box-1", result_plaintext(4), crypto.generate_keypair()[1]),
        T0,
    )
    good = _results(1, pub, start=50)
    write_routed(
        tmp_path / "in",
        [forged, v2, garbage, bad_json, nan_stats, neg_stats, short_stats, evil_bundle, other_key, *good],
    )
    s = _ingest(tmp_path / "in", tmp_path / "store", keys)
    assert s.accepted == 1
    assert s.rejected == {"sender_mismatch": 1, "unknown_schema": 1, "malformed": 1, "invalid": 4, "undecryptable": 2}
    rej = _rejects(s)
    assert {r["reason"] for r in rej} == set(s.rejected) and all(r["source"].startswith(str(tmp_path)) for r in rej)
    assert not (tmp_path / "etc").exists() and not list((tmp_path / "store").glob("results/*/bundle=..*"))
    assert _q(tmp_path / "store", "results", "SELECT mid FROM {T}") == [("mid-50",)]


def _sync_of(data: bytes) -> bytes:
    fo = io.BytesIO(data)
    return fastavro.schemaless_reader(fo, sources.HEADER_SCHEMA, None)["sync"]


def _multi_block_file(path: Path, recs: list[dict]) -> bytes:
    buf = io.BytesIO()
    schema = fastavro.parse_schema(__import__("testsupport.fakehub.routing", fromlist=["x"]).MESSAGE_SCHEMA)
    fastavro.writer(buf, schema, recs, sync_interval=1)  # one record per block
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def test_corrupt_and_truncated_avro_lose_only_their_bad_part(tmp_path: Path, keys) -> None:
    src = tmp_path / "in"
    src.mkdir()
    recs = _results(6, keys["pub"])
    data = _multi_block_file(src / "a", recs)
    # corrupt the 3rd block: its record count claims 63 records where 1 was written
    reader_blocks = list(fastavro.block_reader(io.BytesIO(data)))
    assert len(reader_blocks) == 6
    sync = _sync_of(data)
    marks = [k for k in range(len(data)) if data.startswith(sync, k)]
    third = marks[2] + 16
    assert data[third] == 0x02  # zig-zag 1
    corrupted = bytearray(data)
    corrupted[third] = 0x7E
    (src / "a").write_bytes(bytes(corrupted))
    # a truncated file: its last block cut
    _multi_block_file(src / "b", _results(3, keys["pub"], start=100))
    (src / "b").write_bytes((src / "b").read_bytes()[:-30])
    (src / "c").write_bytes(b"this is not avro at all")
    _multi_block_file(src / "d", _results(2, keys["pub"], start=200))
    s = _ingest(src, tmp_path / "store", keys)
    mids = {m for (m,) in _q(tmp_path / "store", "results", "SELECT mid FROM {T}")}
    assert mids == {f"mid-{i}" for i in (0, 1, 3, 4, 5, 100, 101, 200, 201)}
    rej = _rejects(s)
    assert {(Path(r["source"]).name, r["reason"]) for r in rej} == {
        ("a", "corrupt_block"),
        ("b", "corrupt_block"),
        ("c", "corrupt_file"),
    }


def test_a_store_of_a_newer_schema_is_refused_and_left_untouched(tmp_path: Path, keys, keyfile) -> None:
    write_routed(tmp_path / "in", _results(2, keys["pub"]))
    store = tmp_path / "store"
    store.mkdir()
    (store / "_schema.json").write_text(json.dumps({"name": "clinicai-store", "version": 2}))
    before = sorted(p.relative_to(store) for p in store.rglob("*"))
    with pytest.raises(store_schema.StoreSchemaError, match="version 2"):
        Ingest(store, {"central-1": keys["priv"]})
    res = CliRunner().invoke(
        app, ["central", "ingest", "--from", str(tmp_path / "in"), "--to", str(store), "--key", str(keyfile)]
    )
    assert res.exit_code == 2 and "version 2" in res.output
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == before


def test_cli_reads_a_jsonl_export_and_a_sites_csv(tmp_path: Path, keys, keyfile) -> None:
    pub = keys["pub"]
    lines = []
    for i in range(3):
        body = seal("result", "result/v1", f"j-{i}", "box-9", result_plaintext(i), pub)
        ev = {
            "system_properties": {
                "iothub-connection-device-id": "box-9",
                "iothub-enqueuedtime": "2026-03-04T05:06:07.123Z",
            },
            "properties": {"type": "result"},
        }
        if i == 2:
            ev["body_b64"] = base64.b64encode(body).decode()
        else:
            ev["body"] = body.decode()
        lines.append(json.dumps(ev))
    lines.append("{not json")
    (tmp_path / "export.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "sites.csv").write_text("device,site,region,health_system,setting\nbox-9,mombasa,coast,,urban\n")
    store = tmp_path / "store"
    res = CliRunner().invoke(
        app,
        [
            "central",
            "ingest",
            "--from",
            str(tmp_path / "export.jsonl"),
            "--to",
            str(store),
            "--key",
            str(keyfile),
            "--sites",
            str(tmp_path / "sites.csv"),
        ],
    )
    assert res.exit_code == 1, res.output  # one line refused, the rest stored
    summary = json.loads(res.stdout.splitlines()[0])
    assert summary["accepted"] == 3 and summary["rejected"] == {"malformed": 1}
    rows = _q(store, "results", "SELECT date, site, region, health_system, setting FROM {T}")
    assert set(rows) == {(dt.date(2026, 3, 4), "mombasa", "coast", None, "urban")}


def test_open_record_returns_refusals_for_any_input(keys) -> None:
    body = seal("result", "result/v1", "m", "box-1", result_plaintext(1), keys["pub"])
    k = {"central-1": keys["priv"]}
    ok = received.open_record({"SystemProperties": {"connectionDeviceId": "box-1"}, "Body": body}, k)
    assert isinstance(ok, received.Opened) and ok.meta["mid"] == "m"
    for rec, reason in [
        ({"SystemProperties": {"connectionDeviceId": "box-2"}, "Body": body}, "sender_mismatch"),
        ({"SystemProperties": {}, "Body": body}, "no_identity"),
        ({"SystemProperties": {"connectionDeviceId": "box-1"}, "Body": None}, "malformed"),
        ({"envelope": "bare"}, "no_identity"),
        ([1, 2], "malformed"),
    ]:
        out = received.open_record(rec, k)  # type: ignore[arg-type]
        assert isinstance(out, received.Refused) and out.reason == reason, (rec, out)


def test_crashed_run_leftovers_are_removed_and_rerun_completes(tmp_path: Path, keys) -> None:
    write_routed(tmp_path / "in", _results(3, keys["pub"]))
    store = tmp_path / "store"
    run = Ingest(store, {"central-1": keys["priv"]})
    run.feed_all(sources.read_path(tmp_path / "in"))
    run._writers.close()  # files closed but the run never committed: as if killed here
    leftovers = list(store.rglob(".part-*.tmp"))
    assert leftovers
    run.db.close()
    run._lock_fh.close()  # type: ignore[union-attr]
    s = _ingest(tmp_path / "in", store, keys)
    assert s.accepted == 3 and not list(store.rglob(".part-*"))
    assert _q(store, "results", "SELECT count(*) FROM {T}") == [(3,)]


def test_storage_endpoint_is_strict_and_batches_like_iot_hub(tmp_path: Path, keys) -> None:
    sink = folder_sink(tmp_path / "blobs")
    for bad in (
        {"batch_frequency_s": 59},
        {"batch_frequency_s": 721},
        {"max_chunk_bytes": 10_485_759},
        {"encoding": "json"},
        {"file_name_format": "{iothub}/{partition}/{YYYY}/{MM}/{DD}/{HH}"},
    ):
        with pytest.raises(ValueError):
            StorageEndpoint(sink, **bad)
    clock = [T0]
    ep = StorageEndpoint(
        sink,
        iothub="hub1",
        partitions=4,
        max_chunk_bytes=10_485_760,
        encoding="avrodeflate",
        file_name_format="{iothub}/{YYYY}/{MM}/{DD}/{HH}/{mm}/{partition}",
        clock=lambda: clock[0],
    )
    big = b"x" * 4_000_000
    for i in range(3):  # 12 MB to one device's partition: the 10 MB chunk closes a blob early
        ep.route(routed("box-1", "result", f"b-{i}", big, T0))
    ep.route(routed("box-2", "result", "c-1", b"small", T0))
    names = ep.flush()
    ep.close()
    p1, p2 = ep.partition_of("box-1"), ep.partition_of("box-2")
    assert f"hub1/2026/03/01/10/00/{p1}" in ep.written and f"hub1/2026/03/01/10/00/{p1}-1" in ep.written
    assert f"hub1/2026/03/01/10/00/{p2}" in names or p1 == p2
    with open(tmp_path / "blobs" / f"hub1/2026/03/01/10/00/{p1}", "rb") as fh:
        r = fastavro.reader(fh)
        assert r.codec == "deflate" and r.writer_schema["name"] == "Microsoft.Azure.Devices.Message"
        first = next(iter(r))
    assert first["EnqueuedTimeUtc"] == dotnet_utc(T0) == "2026-03-01T10:00:00.2500000Z"
    sysp = first["SystemProperties"]
    assert sysp["connectionDeviceId"] == "box-1" and sysp["messageId"] == "b-0"
    assert sysp["contentType"] == "application/json" and sysp["contentEncoding"] == "utf-8"
    assert first["Properties"] == {"type": "result"}


def test_the_box_never_loads_the_central_extra() -> None:
    # the daemon's entry points (CLI + composition root) imported afresh: no pyarrow/fastavro/duckdb, no ingest
    import importlib
    import sys

    heavy = ("pyarrow", "fastavro", "duckdb", "appliance.central.ingest", "appliance.central.sources")
    saved = {m: sys.modules.pop(m) for m in list(sys.modules) if m.startswith(heavy) or m.startswith("appliance")}
    try:
        importlib.import_module("appliance.cli")
        importlib.import_module("appliance.app.compose")
        assert not [m for m in sys.modules if m.startswith(heavy)]
    finally:
        for m in [m for m in sys.modules if m.startswith(heavy) or m.startswith("appliance")]:
            del sys.modules[m]
        sys.modules.update(saved)
