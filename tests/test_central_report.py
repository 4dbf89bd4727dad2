"""The central report on DuckDB: every number is recomputed here from the fixture's rows with numpy / plain Python
(not through the report's SQL) and compared; plus the store checks, filters and the CLI's JSON."""

from __future__ import annotations

import datetime as dt
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from appliance.central import report_sql
from appliance.central.report import (
    Filters,
    ReportError,
    build_report,
    parse_reference,
    to_json,
)
from appliance.central.report_engine import DuckDBEngine
from engines.drift import ks_binned
from testsupport.central_store import BUNDLE, LABELS, make_store, write_schema_marker

EDGES = [round(i * 0.05, 2) for i in range(21)]
EPS = 1e-4
# the validation set: the unshifted sites' score distribution (beta(2, 5)), sampled independently
REF_SCORES = {
    label: [int(c) for c in np.histogram(np.random.default_rng(seed).beta(2.0, 5.0, 4000), bins=EDGES)[0]]
    for seed, label in enumerate(LABELS)
}


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("central") / "store")


@pytest.fixture(scope="module")
def reference():
    return parse_reference(
        *BUNDLE, {"n": 400, "score_edges": EDGES, "scores": REF_SCORES}, {"psi_alert": 0.2, "min_studies": 20}, "t"
    )


@pytest.fixture(scope="module")
def report(fx, reference):
    engine = DuckDBEngine()
    try:
        return build_report(engine, fx.root, Filters(), [reference])
    finally:
        engine.close()


def week(ts: dt.datetime | dt.date) -> str:
    d = ts.astimezone(dt.timezone.utc).date() if isinstance(ts, dt.datetime) else ts
    return (d - dt.timedelta(days=d.weekday())).isoformat()


def rows_by(report, table, *keys):
    return {tuple(r[k] for k in keys): r for r in report["tables"][table]["rows"]}


def psi(p_counts, q_counts):
    p = np.maximum(np.asarray(p_counts, float) / sum(p_counts), EPS)
    q = np.maximum(np.asarray(q_counts, float) / sum(q_counts), EPS)
    return float(np.sum((p - q) * np.log(p / q)))


def test_volume_per_site_and_week(fx, report):
    expected = defaultdict(lambda: {"studies": 0, "images": 0, "refused_images": 0, "urgent": 0, "devices": set()})
    for r in fx.rows["results"]:
        e = expected[(r["site"], week(r["enqueued_time"]))]
        e["studies"] += 1
        e["images"] += r["n_images"]
        e["refused_images"] += r["n_refused"]
        e["urgent"] += r["urgent"]
        e["devices"].add(r["device"])
    got = rows_by(report, "volume", "site", "week")
    assert set(got) == set(expected) and len(got) == 3 * 3  # 2 sites + no site, 3 weeks
    for key, e in expected.items():
        g = got[key]
        assert (g["studies"], g["images"], g["refused_images"], g["urgent"], g["devices"]) == (
            e["studies"], e["images"], e["refused_images"], e["urgent"], len(e["devices"])
        )  # fmt: skip
    assert got[("south", "2025-01-06")]["devices"] == 2


def test_score_quantiles_and_positive_rates(fx, report):
    scores, studies, positives = defaultdict(list), defaultdict(set), defaultdict(set)
    for f in fx.rows["findings"]:
        key = (f["site"], week(f["enqueued_time"]), f["label"])
        scores[key].append(f["score"])
        studies[key].add(f["mid"])
        if f["score"] >= 0.5:
            positives[key].add(f["mid"])
    got = rows_by(report, "labels", "site", "week", "label")
    assert set(got) == set(scores)
    for key, s in scores.items():
        g = got[key]
        for p, col in ((0.05, "score_p05"), (0.25, "score_p25"), (0.5, "score_p50"), (0.75, "score_p75"),
                       (0.95, "score_p95")):  # fmt: skip
            assert g[col] == pytest.approx(float(np.quantile(s, p)), abs=1e-12)
        assert g["score_mean"] == pytest.approx(float(np.mean(s)), abs=1e-12)
        assert g["findings"] == len(s) and g["studies"] == len(studies[key])
        assert g["positive_studies"] == len(positives[key])
        assert g["positive_rate"] == pytest.approx(len(positives[key]) / len(studies[key]), abs=1e-12)


def test_psi_against_reference_and_fleet(fx, report):
    scores = defaultdict(list)
    for f in fx.rows["findings"]:
        scores[(f["site"], week(f["enqueued_time"]), f["label"])].append(f["score"])
    got = rows_by(report, "drift", "site", "week", "label")
    assert set(got) == set(scores)
    for (site, wk, label), s in scores.items():
        g = got[(site, wk, label)]
        counts, _ = np.histogram(s, bins=EDGES)
        assert g["n"] == len(s) == counts.sum()
        assert g["reference_n"] == sum(REF_SCORES[label])
        assert g["psi_reference"] == pytest.approx(psi(counts, REF_SCORES[label]), abs=1e-9)
        others = [x for (st, w, lb), v in scores.items() if st != site and w == wk and lb == label for x in v]
        other_counts, _ = np.histogram(others, bins=EDGES)
        assert g["fleet_n"] == len(others)
        assert g["psi_fleet"] == pytest.approx(psi(counts, other_counts), abs=1e-9)
        # the binned two-sample KS test (engines.drift.ks_binned, checked against tabulated values in test_drift)
        d_ref, p_ref = ks_binned(REF_SCORES[label], counts)
        assert g["ks_d_reference"] == pytest.approx(d_ref, abs=1e-9)
        assert g["p_reference"] == pytest.approx(p_ref, rel=1e-9, abs=1e-12)
        if others:
            d_fleet, p_fleet = ks_binned(other_counts, counts)
            assert g["ks_d_fleet"] == pytest.approx(d_fleet, abs=1e-9)
            assert g["p_fleet"] == pytest.approx(p_fleet, rel=1e-9, abs=1e-12)
        # the manifest's drift settings (psi_alert 0.2, min_studies 20) and the default p_alert 0.01 decide the flag
        assert g["alert_reference"] == (g["psi_reference"] >= 0.2 and p_ref < 0.01 and len(s) >= 20)
    # the shifted site is flagged against its peers, every week, for both labels; the unshifted "north" is not
    assert all(got[("south", w, lb)]["alert_fleet"] for w in ("2025-01-06", "2025-01-13") for lb in LABELS)
    assert all(got[("south", w, lb)]["alert_reference"] for w in ("2025-01-06", "2025-01-13") for lb in LABELS)
    assert not any(got[("north", w, lb)]["alert_reference"] for w in ("2025-01-06", "2025-01-13") for lb in LABELS)


def test_refusals_from_the_newest_stats_snapshot(fx, report):
    newest: dict[tuple, dict] = {}
    for r in fx.rows["stats"]:
        key = (r["device"], r["day"])
        if key not in newest or r["generated_at"] > newest[key]["generated_at"]:
            newest[key] = r
    keep = {r["mid"] for r in newest.values()}
    refused, images = defaultdict(int), defaultdict(int)
    for r in fx.rows["stats"]:
        if r["mid"] not in keep:
            continue
        if r["metric"] == "refusals":
            refused[(r["site"], week(r["day"]), r["key"])] += r["count"]
        elif r["metric"] == "count:images":
            images[(r["site"], week(r["day"]))] += r["count"]
    got = rows_by(report, "refusals", "site", "week", "reason")
    assert set(got) == set(refused)
    for (site, wk, reason), n in refused.items():
        assert got[(site, wk, reason)]["refused"] == n
        assert got[(site, wk, reason)]["images"] == images[(site, wk)]
        assert got[(site, wk, reason)]["rate"] == pytest.approx(n / images[(site, wk)], abs=1e-12)


def judged_units(fx):
    """(site, week, label) -> list of (score, ai_positive, verdict, outcome, truth), computed the plain way."""
    results = {r["mid"]: r for r in fx.rows["results"]}
    per = defaultdict(lambda: {"score": -1.0, "pos": False})
    for f in fx.rows["findings"]:
        u = per[(f["mid"], f["label"])]
        u["score"] = max(u["score"], f["score"])
        u["pos"] = u["pos"] or f["positive"]
    for mid, r in results.items():
        per[(mid, "(study)")] = {"score": r["study_score"], "pos": any(per[(mid, lb)]["pos"] for lb in LABELS)}
    newest_verdict, newest_outcome = {}, {}
    for fb in sorted(fx.rows["feedback"], key=lambda x: (x["enqueued_time"], x["mid"])):
        if fb["kind"] == "finding":
            newest_verdict[(fb["result_mid"], fb["label"])] = fb["verdict"]
        else:
            newest_outcome[(fb["result_mid"], fb["label"] or "(study)")] = fb["outcome_positive"]
    out = defaultdict(list)
    for (mid, label), u in per.items():
        r = results[mid]
        v, o = newest_verdict.get((mid, label)), newest_outcome.get((mid, label))
        truth = o if o is not None else {"agree": u["pos"], "disagree": not u["pos"]}.get(v)
        out[(r["site"], week(r["enqueued_time"]), label)].append((u["score"], u["pos"], v, o, truth))
    return out


def test_concordance_agreement_ppv_sensitivity(fx, report):
    units = judged_units(fx)
    got = rows_by(report, "concordance", "site", "week", "label")
    expected_keys = {k for k, us in units.items() if any(u[2] is not None or u[3] is not None for u in us)}
    assert set(got) == expected_keys
    for key in expected_keys:
        us, g = units[key], got[key]
        agree = sum(u[2] == "agree" for u in us)
        disagree = sum(u[2] == "disagree" for u in us)
        judged_pos = [u for u in us if u[1] and u[2] in ("agree", "disagree")]
        confirmed = [u for u in us if u[3] is True]
        assert (g["agree"], g["disagree"], g["uncertain"]) == (agree, disagree, sum(u[2] == "uncertain" for u in us))
        assert g["agreement_rate"] == (pytest.approx(agree / (agree + disagree)) if agree + disagree else None)
        assert g["positives_judged"] == len(judged_pos)
        ppv = sum(u[2] == "agree" for u in judged_pos) / len(judged_pos) if judged_pos else None
        assert g["ppv"] == (pytest.approx(ppv) if ppv is not None else None)
        sens = sum(u[1] for u in confirmed) / len(confirmed) if confirmed else None
        assert g["outcomes_positive"] == len(confirmed)
        assert g["sensitivity"] == (pytest.approx(sens) if sens is not None else None)
    assert any(g["sensitivity"] is not None for g in got.values())  # the fixture does exercise outcomes


def test_calibration_table(fx, report):
    units = judged_units(fx)
    per_site = defaultdict(list)
    for (site, _wk, label), us in units.items():
        per_site[(site, label)].extend(us)
    got = rows_by(report, "calibration", "site", "label", "threshold")
    thresholds = [round(k * 0.05, 2) for k in range(1, 20)]
    assert set(got) == {(s, lb, t) for (s, lb) in per_site for t in thresholds}
    for (site, label), us in per_site.items():
        for t in thresholds:
            g = got[(site, label, t)]
            tp = sum(1 for u in us if u[4] is True and u[0] >= t)
            fp = sum(1 for u in us if u[4] is False and u[0] >= t)
            fn = sum(1 for u in us if u[4] is True and u[0] < t)
            tn = sum(1 for u in us if u[4] is False and u[0] < t)
            assert (g["tp"], g["fp"], g["fn"], g["tn"]) == (tp, fp, fn, tn)
            for col, num, den in (("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp), ("ppv", tp, tp + fp),
                                  ("npv", tn, tn + fn)):  # fmt: skip
                assert g[col] == (pytest.approx(num / den, abs=1e-12) if den else None)
            assert g["referral_rate"] == pytest.approx(sum(u[0] >= t for u in us) / len(us), abs=1e-12)
    # sensitivity cannot rise as the threshold rises; the table is usable for picking an operating point
    north = [got[("north", "nodule", t)]["sensitivity"] for t in thresholds]
    assert all(a >= b for a, b in zip(north, north[1:], strict=False) if a is not None and b is not None)


def test_site_filter_and_since(fx, reference):
    engine = DuckDBEngine()
    try:
        rep = build_report(engine, fx.root, Filters(site="north", since=dt.date(2025, 1, 13)), [reference])
    finally:
        engine.close()
    vol = rep["tables"]["volume"]["rows"]
    assert {r["site"] for r in vol} == {"north"}
    assert [r["week"] for r in vol] == ["2025-01-13", "2025-01-20"]
    expected = sum(
        1 for r in fx.rows["results"] if r["site"] == "north" and r["enqueued_time"].date() >= dt.date(2025, 1, 13)
    )
    assert sum(r["studies"] for r in vol) == expected
    assert {r["site"] for t in rep["tables"].values() for r in t["rows"]} == {"north"}
    # --site narrows the rows, not the fleet: north is still compared with every other site of the same weeks
    scores = defaultdict(list)
    for f in fx.rows["findings"]:
        if f["enqueued_time"].date() >= dt.date(2025, 1, 13):
            scores[(f["site"], week(f["enqueued_time"]), f["label"])].append(f["score"])
    drift = rows_by(rep, "drift", "week", "label")
    assert set(drift) == {(w, lb) for (st, w, lb) in scores if st == "north"}
    for (wk, label), g in drift.items():
        others = [x for (st, w, lb), v in scores.items() if st != "north" and w == wk and lb == label for x in v]
        assert others and g["fleet_n"] == len(others)
        counts, _ = np.histogram(scores[("north", wk, label)], bins=EDGES)
        other_counts, _ = np.histogram(others, bins=EDGES)
        assert g["psi_fleet"] == pytest.approx(psi(counts, other_counts), abs=1e-9)


def test_site_filter_keeps_the_shifted_sites_fleet_alert(fx, report, reference):
    """The site that drifted from its peers is flagged in its own report (--site) as in the fleet's report."""
    engine = DuckDBEngine()
    try:
        rep = build_report(engine, fx.root, Filters(site="south"), [reference])
    finally:
        engine.close()
    alone = rows_by(rep, "drift", "week", "label")
    everyone = rows_by(report, "drift", "site", "week", "label")
    whole = {(w, lb): r for (st, w, lb), r in everyone.items() if st == "south"}
    assert alone.keys() == whole.keys() and any(r["alert_fleet"] for r in alone.values())
    for key, r in alone.items():
        assert (r["fleet_n"], r["alert_fleet"]) == (whole[key]["fleet_n"], whole[key]["alert_fleet"])
        assert r["psi_fleet"] == pytest.approx(whole[key]["psi_fleet"], abs=1e-12)


def test_until_is_inclusive(fx):
    engine = DuckDBEngine()
    try:
        rep = build_report(engine, fx.root, Filters(until=dt.date(2025, 1, 6)))
    finally:
        engine.close()
    expected = sum(1 for r in fx.rows["results"] if r["enqueued_time"].date() == dt.date(2025, 1, 6))
    assert sum(r["studies"] for r in rep["tables"]["volume"]["rows"]) == expected > 0


def test_empty_store_gives_empty_tables(tmp_path):
    write_schema_marker(tmp_path / "store")
    engine = DuckDBEngine()
    try:
        rep = build_report(engine, tmp_path / "store")
    finally:
        engine.close()
    for name, table in rep["tables"].items():
        assert table["rows"] == [], name
        assert table["columns"], name
    json.loads(to_json(rep))


def test_empty_columns_match_the_queries(report):
    for name, table in report["tables"].items():
        assert table["rows"], name
        assert list(table["rows"][0]) == table["columns"], name
    from appliance.central.report import _EMPTY_COLUMNS

    assert {n: list(c) for n, c in _EMPTY_COLUMNS.items()} == {n: t["columns"] for n, t in report["tables"].items()}
    assert list(report_sql.QUERIES) == list(report["tables"])


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ({"name": "clinicai-store", "version": 2}, "version 2"),
        ({"name": "other", "version": 1}, "not a clinicai-store"),
        (None, "no _schema.json"),
        ("{not json", "unreadable"),
    ],
)
def test_store_refused(tmp_path, marker, message):
    store = tmp_path / "store"
    store.mkdir()
    if isinstance(marker, dict):
        (store / "_schema.json").write_text(json.dumps(marker))
    elif isinstance(marker, str):
        (store / "_schema.json").write_text(marker)
    with pytest.raises(ReportError, match=message):
        build_report(DuckDBEngine(), store)


@pytest.mark.parametrize(
    "bad",
    [
        {"n": 1, "score_edges": EDGES[:-1], "scores": REF_SCORES},
        {"n": 1, "score_edges": EDGES, "scores": {"nodule": [1] * 19}},
        {"n": 1, "score_edges": EDGES, "scores": {"nodule": [1] * 19 + [-1]}},
        {"n": 1, "score_edges": EDGES, "scores": {"nodule": [1.5] * 20}},
        {"n": -1, "score_edges": EDGES, "scores": REF_SCORES},
        [],
    ],
)
def test_malformed_reference_refused(bad):
    with pytest.raises(ReportError):
        parse_reference(*BUNDLE, bad, None, "t")


def test_cli_json_and_newer_store(fx, tmp_path):
    from appliance.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["central", "report", "--store", str(fx.root), "--site", "south", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["report"] == "clinicai-central-report" and doc["filters"]["site"] == "south"
    assert doc["psi"]["epsilon"] == EPS and doc["thresholds"][0] == 0.05
    assert {r["site"] for r in doc["tables"]["volume"]["rows"]} == {"south"}
    assert all(not (isinstance(v, float) and math.isnan(v)) for t in doc["tables"].values() for r in t["rows"]
               for v in r.values())  # fmt: skip

    newer = tmp_path / "newer"
    write_schema_marker(newer, version=2)
    res = runner.invoke(app, ["central", "report", "--store", str(newer), "--json"])
    assert res.exit_code == 2 and "version 2" in res.output

    res = runner.invoke(app, ["central", "report", "--store", str(fx.root), "--since", "2025-13-01"])
    assert res.exit_code == 2

    res = runner.invoke(app, ["central", "report", "--store", str(fx.root)])
    assert res.exit_code == 0 and "DRIFT south" in res.stdout


def test_bundle_without_reference_is_no_reference(tmp_path):
    from appliance.central.report import references_from_bundles

    legacy = Path(__file__).resolve().parent / "data" / "legacy-bundles"
    assert references_from_bundles([legacy]) == []  # the 1.0.1 bundles predate `reference`
    shipped = Path(__file__).resolve().parents[1] / "engines" / "reference" / "bundles"
    got = {(r.bundle_id, r.bundle_version): r for r in references_from_bundles([shipped])}
    assert set(got) == {("cxr-phantom", "1.0.2"), ("mmg-phantom", "1.0.2")}  # re-issued with their reference
    assert got[("cxr-phantom", "1.0.2")].n == 120
    with pytest.raises(ReportError):
        references_from_bundles([tmp_path / "missing.bundle"])


@pytest.mark.integration
def test_the_box_never_imports_the_central_engines():
    """The daemon's composition root and the whole CLI load without duckdb, pyarrow or pyspark (a fresh
    interpreter: what this test process already imported does not count)."""
    import subprocess
    import sys

    code = (
        "import sys, appliance.cli, appliance.app.compose; "
        "print(','.join(m for m in ('pyspark', 'duckdb', 'pyarrow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == ""
