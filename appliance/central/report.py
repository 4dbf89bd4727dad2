"""The central team's report over the results store: per site x bundle version x ISO week.

:func:`build_report` runs :data:`appliance.central.report_sql.QUERIES` on an engine (DuckDB by default, Spark at
fleet scale) over a store folder (docs/CENTRAL.md, "Central store") and returns one JSON-able document::

    {"report": "clinicai-central-report", "version": 1, "engine": "duckdb" | "spark",
     "generated_at": "<ISO 8601 UTC>", "store": "<path>", "store_version": 1,
     "filters": {"site": str | null, "since": "YYYY-MM-DD" | null, "until": "YYYY-MM-DD" | null},
     "psi": {"formula": str, "epsilon": 1e-4, "score_edges": [21 floats], "alert": {...}},
     "references": {"<bundle_id>@<version>": {"n": int, "labels": [str], "scores": {label: [20 ints]},
                                             "drift": {...}, "source": "<bundle file>"}},
     "thresholds": [0.05, ..., 0.95],
     "tables": {name: {"columns": [str], "rows": [{column: value}]}}}

with the tables ``volume``, ``labels``, ``drift``, ``score_histograms``, ``refusals``, ``concordance`` and
``calibration`` (their columns are documented in docs/CENTRAL.md). ``week`` is the Monday (``YYYY-MM-DD``) of
the ISO week of the hub's enqueued time (UTC). The SQL computes every number; this module only adds the drift
alert flags and assembles the document.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.central import report_sql, store_schema
from appliance.central.report_engine import Engine, dialect

REPORT_NAME = "clinicai-central-report"
REPORT_VERSION = 1

# The stats/v1 score edges: 0.0, 0.05, ..., 1.0 (i / 20 is the double nearest each decimal edge).
SCORE_EDGES = [i / 20 for i in range(21)]
# Candidate operating points of the calibration table: 0.05, 0.10, ..., 0.95.
THRESHOLDS = [k / 20 for k in range(1, 20)]
# When the bundle's manifest gives no ``drift`` settings (the manifest contract's defaults).
DEFAULT_DRIFT = {"psi_alert": 0.25, "p_alert": 0.01, "min_studies": 50}

PSI_FORMULA = (
    "PSI = sum over the 20 score bins of (p_i - q_i) * ln(p_i / q_i), p_i = the site's share of scores in bin i, "
    "q_i = the reference's (or the other sites' pooled) share, each share floored at epsilon"
)


class ReportError(Exception):
    """The report cannot be made: the store or a reference is unusable. The message says why."""


@dataclass(frozen=True)
class Filters:
    """Which rows the report covers: one site (the twin tag ``site``) or all; the UTC dates of the hub's
    enqueued time (``stats``: the box's day), ``since`` and ``until`` inclusive."""

    site: str | None = None
    since: dt.date | None = None
    until: dt.date | None = None


@dataclass(frozen=True)
class Reference:
    """A bundle version's validation-set score distributions (the manifest's ``reference``): ``n`` studies,
    ``scores`` label -> 20 counts on :data:`SCORE_EDGES`; ``drift`` the manifest's drift settings or {}."""

    bundle_id: str
    bundle_version: str
    n: int
    scores: dict[str, list[int]]
    drift: dict[str, Any]
    source: str


def check_store(store: Path) -> int:
    """The store's schema version (``store_schema.check_store``, the one check of a store). Raises
    :class:`ReportError` for a folder that is not a store, an unreadable schema file, or a version newer than
    :data:`appliance.central.store_schema.VERSION`."""
    if not Path(store).is_dir():
        raise ReportError(f"{store}: no such store folder")
    try:
        store_schema.check_store(Path(store))
        return int(store_schema.read_version(Path(store)) or 0)
    except store_schema.StoreSchemaError as exc:
        raise ReportError(str(exc)) from exc


def parse_reference(bundle_id: str, bundle_version: str, reference: Any, drift: Any, source: str) -> Reference:
    """Validate a manifest's ``reference`` (and ``drift``) for the report. Raises :class:`ReportError` for wrong
    shapes: edges other than :data:`SCORE_EDGES`, a histogram that is not 20 non-negative integers."""
    where = f"{source}: reference of {bundle_id}@{bundle_version}"
    if not isinstance(reference, Mapping):
        raise ReportError(f"{where}: not an object")
    edges = reference.get("score_edges")
    if (
        not isinstance(edges, list)
        or len(edges) != len(SCORE_EDGES)
        or any(not isinstance(e, int | float) or abs(e - s) > 1e-9 for e, s in zip(edges, SCORE_EDGES, strict=True))
    ):
        raise ReportError(f"{where}: score_edges must be the 21 stats/v1 edges 0.0, 0.05, ..., 1.0")
    scores = reference.get("scores")
    if not isinstance(scores, Mapping):  # may be empty: a reference of the inputs only
        raise ReportError(f"{where}: scores must map each label to 20 counts")
    clean: dict[str, list[int]] = {}
    for label, counts in scores.items():
        if (
            not isinstance(label, str)
            or not isinstance(counts, list)
            or len(counts) != len(SCORE_EDGES) - 1
            or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts)
        ):
            raise ReportError(f"{where}: scores[{str(label)[:40]!r}] must be 20 non-negative integers")
        clean[label] = list(counts)
    n = reference.get("n")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ReportError(f"{where}: n must be a non-negative integer")
    settings = dict(drift) if isinstance(drift, Mapping) else {}
    return Reference(bundle_id, bundle_version, n, clean, settings, source)


def _as_dict(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    return dump() if callable(dump) else value


def references_from_bundles(paths: list[Path]) -> list[Reference]:
    """The ``reference`` of each bundle file (``*.bundle``; a folder: every bundle file in it, e.g. the TUF
    repository's targets folder). The manifests are read without checking signatures (the central team's own
    bundles, feeding a report, not a box); a bundle without a reference is skipped. Raises :class:`ReportError`
    for an unreadable bundle or a malformed reference."""
    from engines.bundle import read_manifest_unverified
    from engines.errors import BundleError

    files: list[Path] = []
    for p in paths:
        files.extend(sorted(Path(p).rglob("*.bundle")) if Path(p).is_dir() else [Path(p)])
    out = []
    for f in files:
        try:
            manifest = read_manifest_unverified(f)
        except (BundleError, OSError) as exc:
            raise ReportError(f"{f}: {exc}") from exc
        reference = _as_dict(getattr(manifest, "reference", None))
        if reference:
            drift = _as_dict(getattr(manifest, "drift", None))
            out.append(parse_reference(manifest.bundle_id, manifest.version, reference, drift, str(f)))
    return out


def _register(engine: Engine, store: Path, filters: Filters, references: list[Reference]) -> None:
    for table in store_schema.TABLES:
        folder = Path(store) / table
        try:
            files = store_schema.check_table_files(Path(store), table)
        except store_schema.StoreSchemaError as exc:
            raise ReportError(str(exc)) from exc
        if files:
            engine.register_parquet(table, folder)
        else:
            engine.register_rows(table, report_sql.STORE_COLUMNS[table], [])
    rows: dict[str, list[tuple[Any, ...]]] = {
        "report_filter": [(filters.site, filters.since, filters.until)],
        "score_bins": [(i, SCORE_EDGES[i], SCORE_EDGES[i + 1], i == len(SCORE_EDGES) - 2) for i in range(20)],
        "thresholds": [(t,) for t in THRESHOLDS],
        "reference_bins": [
            (ref.bundle_id, ref.bundle_version, label, i, c)
            for ref in references
            for label, counts in sorted(ref.scores.items())
            for i, c in enumerate(counts)
        ],
    }
    for name, columns in report_sql.CONSTANT_TABLES.items():
        engine.register_rows(name, columns, rows[name])
    for name, sql in report_sql.FILTERED_VIEWS.items():
        engine.create_view(name, dialect(engine, sql))


def run_queries(engine: Engine, store: Path, filters: Filters, references: list[Reference]) -> dict[str, list]:
    """Every report query's rows (table name -> list of row dicts), numbers as the engine computed them."""
    _register(engine, store, filters, references)
    return {name: engine.query(dialect(engine, sql)) for name, sql in report_sql.QUERIES.items()}


def _columns(sql_name: str, rows: list[dict[str, Any]]) -> list[str]:
    return list(rows[0]) if rows else list(_EMPTY_COLUMNS[sql_name])


# Column names of each table, for an empty one (kept in step with report_sql by tests/test_central_report.py).
_EMPTY_COLUMNS: dict[str, tuple[str, ...]] = {
    "volume": ("site", "bundle_id", "bundle_version", "week", "studies", "devices", "images", "refused_images",
               "urgent"),
    "labels": ("site", "bundle_id", "bundle_version", "week", "label", "findings", "studies", "positive_studies",
               "positive_rate", "score_mean", "score_p05", "score_p25", "score_p50", "score_p75", "score_p95"),
    "drift": ("site", "bundle_id", "bundle_version", "week", "label", "n", "reference_n", "psi_reference", "fleet_n",
              "psi_fleet", "ks_d_reference", "ks_d_fleet", "p_reference", "alert_reference", "p_fleet", "alert_fleet"),
    "score_histograms": ("site", "bundle_id", "bundle_version", "label", "bin", "n"),
    "refusals": ("site", "bundle_id", "bundle_version", "week", "reason", "refused", "images", "rate"),
    "concordance": ("site", "bundle_id", "bundle_version", "week", "label", "agree", "disagree", "uncertain",
                    "agreement_rate", "positives_judged", "positives_agreed", "ppv", "outcomes", "outcomes_positive",
                    "outcomes_positive_flagged", "sensitivity"),
    "calibration": ("site", "bundle_id", "bundle_version", "label", "threshold", "studies", "with_truth", "tp", "fp",
                    "fn", "tn", "sensitivity", "specificity", "ppv", "npv", "referral_rate"),
}  # fmt: skip


def _flag_drift(rows: list[dict[str, Any]], references: list[Reference]) -> None:
    """Add ``p_reference`` / ``p_fleet`` (the binned two-sample KS test's p-value, ``engines.drift.ks_p_value``)
    and ``alert_reference`` / ``alert_fleet``: the box's rule (``engines.drift.compare``), PSI >= the bundle's
    ``drift.psi_alert`` AND p < ``drift.p_alert``, with at least ``drift.min_studies`` scores in the site's week
    (the manifest's settings, else :data:`DEFAULT_DRIFT`): a large shift that is not sampling noise."""
    from engines.drift import ks_p_value

    settings = {(r.bundle_id, r.bundle_version): {**DEFAULT_DRIFT, **r.drift} for r in references}
    for row in rows:
        s = settings.get((row["bundle_id"], row["bundle_version"]), DEFAULT_DRIFT)
        enough = row["n"] >= s["min_studies"]
        for kind in ("reference", "fleet"):
            psi, d, other_n = row[f"psi_{kind}"], row[f"ks_d_{kind}"], row[f"{kind}_n"]
            p = ks_p_value(d, row["n"], other_n) if d is not None and row["n"] and other_n else None
            row[f"p_{kind}"] = p
            row[f"alert_{kind}"] = bool(
                enough
                and psi is not None
                and math.isfinite(psi)
                and psi >= s["psi_alert"]
                and p is not None
                and p < s["p_alert"]
            )


def build_report(
    engine: Engine, store: Path, filters: Filters = Filters(), references: list[Reference] | None = None
) -> dict[str, Any]:
    """The report document (module docstring) of ``store`` on ``engine``. Raises :class:`ReportError` for a
    store that is missing or newer than this reader, or a Parquet file of it that is not of the published schema
    (:func:`appliance.central.store_schema.check_table_files`)."""
    version = check_store(store)
    refs = list(references or [])
    seen: set[tuple[str, str]] = set()
    for r in refs:
        if (r.bundle_id, r.bundle_version) in seen:
            raise ReportError(f"two references for {r.bundle_id}@{r.bundle_version} ({r.source})")
        seen.add((r.bundle_id, r.bundle_version))
    tables = run_queries(engine, store, filters, refs)
    _flag_drift(tables["drift"], refs)
    return {
        "report": REPORT_NAME,
        "version": REPORT_VERSION,
        "engine": engine.name,
        "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "store": str(store),
        "store_version": version,
        "filters": {
            "site": filters.site,
            "since": filters.since.isoformat() if filters.since else None,
            "until": filters.until.isoformat() if filters.until else None,
        },
        "psi": {
            "formula": PSI_FORMULA,
            "epsilon": report_sql.PSI_EPSILON,
            "score_edges": SCORE_EDGES,
            "alert": {
                "default": DEFAULT_DRIFT,
                "rule": "psi >= psi_alert and p < p_alert (binned two-sample KS) and n >= min_studies",
            },
        },
        "references": {
            f"{r.bundle_id}@{r.bundle_version}": {
                "n": r.n,
                "labels": sorted(r.scores),
                "scores": r.scores,
                "drift": {**DEFAULT_DRIFT, **r.drift},
                "source": r.source,
            }
            for r in refs
        },
        "thresholds": THRESHOLDS,
        "tables": {name: {"columns": _columns(name, rows), "rows": rows} for name, rows in tables.items()},
    }


def to_json(report: dict[str, Any]) -> str:
    """The report as strict JSON (a NaN or infinity, which JSON has no word for, becomes null)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(report), indent=1, sort_keys=False, allow_nan=False)


def _psi(value: float | None) -> str:
    """A PSI for the digest: two decimals, or "-" where there is none (no reference, no other site)."""
    return "-" if value is None else f"{value:.2f}"


def summary(report: dict[str, Any]) -> str:
    """A short plain-text digest for the terminal: studies per site and bundle version, and every drift alert."""
    shown = ", ".join(f"{k} {v}" for k, v in report["filters"].items() if v is not None) or "none"
    lines = [f"store {report['store']} ({report['engine']}); filters: {shown}"]
    if not report["references"]:
        lines.append("  no reference (--bundle): drift is against the fleet only")
    totals: dict[tuple[Any, str], int] = {}
    for row in report["tables"]["volume"]["rows"]:
        key = (row["site"], f"{row['bundle_id']}@{row['bundle_version']}")
        totals[key] = totals.get(key, 0) + int(row["studies"])
    for (site, bundle), studies in sorted(totals.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        lines.append(f"  {site or '(no site)'}  {bundle}: {studies} studies")
    alerts = [r for r in report["tables"]["drift"]["rows"] if r["alert_reference"] or r["alert_fleet"]]
    for r in alerts:
        against = " and ".join(k for k in ("reference", "fleet") if r[f"alert_{k}"])
        lines.append(
            f"DRIFT {r['site'] or '(no site)'} {r['bundle_id']}@{r['bundle_version']} week {r['week']} "
            f"{r['label']}: against the {against} (n {r['n']}; PSI reference {_psi(r['psi_reference'])}, "
            f"fleet {_psi(r['psi_fleet'])})"
        )
    if not totals:
        lines.append("  no results in the store for these filters")
    lines.append("use --json or --html OUT for the whole report")
    return "\n".join(lines)
