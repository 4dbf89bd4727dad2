"""Per bundle version and UTC day: what the box saw and said, as de-identified aggregates; drift against the
bundle's signed reference. The one writer of ``bundle_stats``, ``bundle_stats_final`` and ``bundle_drift``
(migration 0015).

What is counted (each in the caller's transaction, so a count commits with what it counts):

- :func:`record_study`: one analysed study of one bundle version (the transaction that records its result,
  ``appliance.pipeline.results.save_results``; a re-run of the same study revision is not counted again): the
  20-bin histograms (``engines.drift.EDGES``) of each label's image score, of the study score and of each image's
  input mean and 95th percentile, positives per label, studies, images, and the equipment and encoding the images
  came with (``inputs:<name>``: ``manufacturer_model``, ``photometric``, ``bits_stored``, ``size_band``,
  ``transfer_syntax``; each map at most :data:`MAX_KEYS` keys a day, the rest under ``other``).
- :func:`record_refusal`: an image (or study) a bundle did not take, by refusal category (the intended-use gate
  calls it; the worker counts its own ``not_processable`` / ``no_model`` reasons through it,
  ``appliance.pipeline.observe``).
- :func:`record_not_analysed`: a study that ended without analysis by a bundle (``count:not_analysed``).

Nothing identifies a patient or a study: counts per bin and per equipment string only. The day is the UTC day
the result was recorded (not the study date, which never leaves the box).

:func:`snapshot` renders one (bundle version, day) as the ``stats/v1`` document (/work/CENTRAL_SCHEMA.md,
docs/CLOUD.md); :func:`evaluate_drift` compares the last ``window_days`` with the manifest's ``reference``
(``engines.drift.compare``) and keeps the result in ``bundle_drift``, read by the dashboard banner, ``appliance
status`` and the twin's reported ``drift`` property (:func:`drift_report`).
"""

from __future__ import annotations

import datetime as dt
import math
import re
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from appliance.core.logs import get_logger
from engines import drift
from engines.manifest import Manifest

log = get_logger(__name__)

SCHEMA = "stats/v1"
MAX_KEYS = 32  # distinct keys per inputs map and day; the rest are summed under OTHER
OTHER = "other"
INPUT_MAPS = ("manufacturer_model", "photometric", "bits_stored", "size_band", "transfer_syntax")
HISTOGRAMS = ("study_score", "input_mean", "input_p95")  # besides "score:<label>"
# The intended-use gate's refusal categories (issue 16) and those this box's own checks add: what the stats and
# /metrics may carry as a refusal key (anything else is counted as "other", so the label set stays bounded).
REFUSAL_CATEGORIES = frozenset(
    {
        "sop_class",
        "presentation_intent",
        "image_type",
        "burned_in_annotation",
        "age",
        "view",
        "view_modifier",
        "size",
        "bits",
        "photometric",
        "laterality",
        "anatomy",
        "modality",
        "multi_frame",
        "pixel_data",
        "unreadable",
        OTHER,
    }
)
_TEXT = re.compile(r"[^A-Za-z0-9 ._,()/+&-]")


def utc_day(ts: float | None = None) -> str:
    """The UTC day of ``ts`` (seconds since the epoch; default now) as ``YYYY-MM-DD``."""
    return dt.datetime.fromtimestamp(time.time() if ts is None else ts, dt.timezone.utc).strftime("%Y-%m-%d")


def clean_text(value: Any, limit: int = 64) -> str:
    """An equipment string as stats may carry it: stripped, at most ``limit`` characters, anything but letters,
    digits, space and ``._,()/+&-`` replaced by ``_``; empty -> ``unknown``."""
    text = _TEXT.sub("_", str(value or "").strip())[:limit].strip()
    return text or "unknown"


def size_band(rows: int, cols: int) -> str:
    """The band of an image's long side: ``<=1024``, ``1025-2048``, ``2049-3072`` or ``>3072`` pixels."""
    side = max(rows, cols)
    if side <= 1024:
        return "<=1024"
    if side <= 2048:
        return "1025-2048"
    return "2049-3072" if side <= 3072 else ">3072"


@dataclass
class StudyObservation:
    """One analysed study of one bundle version, as :func:`record_study` counts it.

    ``image_scores``: label -> one score in [0, 1] per analysed image; ``study_score``: in [0, 1];
    ``positives``: label -> positive findings; ``input_means`` / ``input_p95s``: one per analysed image, in [0, 1];
    ``inputs``: map name (:data:`INPUT_MAPS`) -> one value per analysed image; ``refusals``: category -> images
    of the study the bundle did not take."""

    bundle_id: str
    bundle_version: str
    study_score: float
    image_scores: dict[str, list[float]] = field(default_factory=dict)
    positives: dict[str, int] = field(default_factory=dict)
    input_means: list[float] = field(default_factory=list)
    input_p95s: list[float] = field(default_factory=list)
    inputs: dict[str, list[str]] = field(default_factory=dict)
    refusals: dict[str, int] = field(default_factory=dict)

    @property
    def images(self) -> int:
        return len(self.input_means)


def _add(conn: sqlite3.Connection, key: tuple[str, str, str], metric: str, k: str, n: int, total: float = 0.0) -> None:
    if n <= 0:
        return
    conn.execute(
        "INSERT INTO bundle_stats(bundle_id, bundle_version, day, metric, key, count, value_sum) VALUES (?,?,?,?,?,?,?)"
        " ON CONFLICT(bundle_id, bundle_version, day, metric, key) DO UPDATE SET count = count + excluded.count,"
        " value_sum = value_sum + excluded.value_sum",
        (*key, metric, k, int(n), float(total)),
    )


def _add_values(conn: sqlite3.Connection, key: tuple[str, str, str], metric: str, values: Sequence[float]) -> None:
    """Count ``values`` into the metric's 20 bins (``engines.drift.histogram``), each bin with its sum."""
    finite = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if len(finite) != len(values):
        log.warning("non-finite values left out of the stats", metric=metric, count=len(values) - len(finite))
    per_bin: dict[int, list[float]] = {}
    for v in finite:
        per_bin.setdefault(drift.bin_index(v), []).append(min(1.0, max(0.0, v)))
    for i, vs in per_bin.items():
        _add(conn, key, metric, str(i), len(vs), sum(vs))


def _add_keyed(conn: sqlite3.Connection, key: tuple[str, str, str], metric: str, values: Mapping[str, int]) -> None:
    """Count a map's keys; a key beyond :data:`MAX_KEYS` distinct ones that day goes under :data:`OTHER`."""
    for k, n in values.items():
        row = conn.execute(
            "SELECT 1 FROM bundle_stats WHERE bundle_id=? AND bundle_version=? AND day=? AND metric=? AND key=?",
            (*key, metric, k),
        ).fetchone()
        if row is None and k != OTHER:
            known = conn.execute(
                "SELECT COUNT(*) FROM bundle_stats WHERE bundle_id=? AND bundle_version=? AND day=? AND metric=?"
                " AND key != ?",
                (*key, metric, OTHER),
            ).fetchone()[0]
            if known >= MAX_KEYS:
                k = OTHER
        _add(conn, key, metric, k, n)


def record_study(conn: sqlite3.Connection, obs: StudyObservation, day: str | None = None) -> None:
    """Count one analysed study (see :class:`StudyObservation`) on ``day`` (default today, UTC), in the caller's
    transaction."""
    key = (obs.bundle_id, obs.bundle_version, day or utc_day())
    _add(conn, key, "count:studies", "", 1)
    _add(conn, key, "count:images", "", obs.images)
    _add_values(conn, key, "study_score", [obs.study_score])
    for label, scores in obs.image_scores.items():
        _add_values(conn, key, f"score:{label}", scores)
        _add(conn, key, f"positives:{label}", "", int(obs.positives.get(label, 0)))
    _add_values(conn, key, "input_mean", obs.input_means)
    _add_values(conn, key, "input_p95", obs.input_p95s)
    for name, values in obs.inputs.items():
        counts: dict[str, int] = {}
        for v in values:
            counts[v] = counts.get(v, 0) + 1
        _add_keyed(conn, key, f"inputs:{name}", counts)
    for category, n in obs.refusals.items():
        _record_refusal(conn, key, category, n)


def _category(category: str) -> str:
    return category if category in REFUSAL_CATEGORIES else OTHER


def _record_refusal(conn: sqlite3.Connection, key: tuple[str, str, str], category: str, n: int) -> None:
    _add(conn, key, "refusals", _category(category), n)


def record_refusal(
    conn: sqlite3.Connection,
    bundle_id: str,
    bundle_version: str,
    category: str,
    day: str | None = None,
    count: int = 1,
) -> None:
    """Count ``count`` images (or studies) that bundle ``bundle_id`` ``bundle_version`` refused, under
    ``category`` (one of :data:`REFUSAL_CATEGORIES`; an unknown one is counted as ``other``), on ``day``
    (``YYYY-MM-DD``, UTC; default today), in the caller's transaction. Never raises for a valid connection."""
    _record_refusal(conn, (bundle_id, bundle_version, day or utc_day()), category, count)


def record_not_analysed(
    conn: sqlite3.Connection, bundle_id: str, bundle_version: str, day: str | None = None, count: int = 1
) -> None:
    """Count a study that bundle ``bundle_id`` ``bundle_version`` applied to but did not analyse (every image
    refused: ``not_processable``, or the intended-use gate's ``not_analysed``), in the caller's transaction."""
    _add(conn, (bundle_id, bundle_version, day or utc_day()), "count:not_analysed", "", count)


# -- reading -----------------------------------------------------------------------------------------------------


def _rows(conn: sqlite3.Connection, bundle_id: str, version: str, days: Sequence[str]) -> list[sqlite3.Row]:
    marks = ",".join("?" * len(days))
    return conn.execute(
        "SELECT metric, key, SUM(count) AS n, SUM(value_sum) AS s FROM bundle_stats WHERE bundle_id=? AND"
        f" bundle_version=? AND day IN ({marks}) GROUP BY metric, key",
        (bundle_id, version, *days),
    ).fetchall()


def _histogram(rows: Iterable[sqlite3.Row], metric: str) -> list[int]:
    counts = [0] * drift.N_BINS
    for r in rows:
        if r["metric"] == metric and r["key"].isdigit() and int(r["key"]) < drift.N_BINS:
            counts[int(r["key"])] += int(r["n"])
    return counts


def _capped(values: Mapping[str, int]) -> dict[str, int]:
    """At most :data:`MAX_KEYS` keys (the largest), the rest summed under :data:`OTHER`."""
    ranked = sorted(((k, n) for k, n in values.items() if k != OTHER), key=lambda kv: (-kv[1], kv[0]))
    out = dict(ranked[:MAX_KEYS])
    rest = sum(n for _, n in ranked[MAX_KEYS:]) + values.get(OTHER, 0)
    if rest:
        out[OTHER] = rest
    return out


def counts(conn: sqlite3.Connection, bundle_id: str, version: str, days: Sequence[str]) -> dict[str, Any]:
    """The aggregates of ``days`` summed: the ``stats/v1`` fields from ``studies`` to ``refusals``."""
    rows = _rows(conn, bundle_id, version, days)
    single = {r["metric"]: int(r["n"]) for r in rows if r["key"] == ""}
    labels = sorted({r["metric"][6:] for r in rows if r["metric"].startswith("score:")})
    labels += sorted({r["metric"][10:] for r in rows if r["metric"].startswith("positives:")} - set(labels))
    maps: dict[str, dict[str, int]] = {name: {} for name in INPUT_MAPS}
    refusals: dict[str, int] = {}
    for r in rows:
        if r["metric"].startswith("inputs:") and r["metric"][7:] in maps:
            maps[r["metric"][7:]][r["key"]] = int(r["n"])
        elif r["metric"] == "refusals":
            refusals[r["key"]] = int(r["n"])
    return {
        "studies": single.get("count:studies", 0),
        "images": single.get("count:images", 0),
        "not_analysed": single.get("count:not_analysed", 0),
        "score_edges": list(drift.EDGES),
        "scores": {label: _histogram(rows, f"score:{label}") for label in labels},
        "study_score": _histogram(rows, "study_score"),
        "positives": {label: single.get(f"positives:{label}", 0) for label in labels},
        "input_edges": list(drift.EDGES),
        "input_mean": _histogram(rows, "input_mean"),
        "input_p95": _histogram(rows, "input_p95"),
        "inputs": {name: _capped(values) for name, values in maps.items()},
        "refusals": refusals,
    }


def snapshot(
    conn: sqlite3.Connection,
    bundle_id: str,
    version: str,
    day: str,
    *,
    final: bool,
    generated_at: str | None = None,
) -> dict[str, Any]:
    """The ``stats/v1`` document of one bundle version and UTC day (docs/CLOUD.md), with the latest drift
    evaluation of the bundle version (``drift``: metric -> {psi, p_value, test, alert}; empty without a
    reference). ``generated_at``: ISO UTC, default now."""
    when = generated_at or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    drift_rows = conn.execute(
        "SELECT metric, psi, p_value, test, alert FROM bundle_drift WHERE bundle_id=? AND bundle_version=?",
        (bundle_id, version),
    ).fetchall()
    return {
        "schema": SCHEMA,
        "day": day,
        "generated_at": when,
        "final": final,
        "bundle_id": bundle_id,
        "bundle_version": version,
        **counts(conn, bundle_id, version, [day]),
        "drift": {
            r["metric"]: {"psi": r["psi"], "p_value": r["p_value"], "test": r["test"], "alert": bool(r["alert"])}
            for r in drift_rows
        },
    }


def bundle_versions(conn: sqlite3.Connection, since_day: str | None = None) -> list[tuple[str, str]]:
    """(bundle id, version) pairs with aggregates on or after ``since_day`` (all when None), sorted."""
    rows = conn.execute(
        "SELECT DISTINCT bundle_id, bundle_version FROM bundle_stats WHERE day >= ? ORDER BY 1, 2",
        (since_day or "",),
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


def totals(conn: sqlite3.Connection, since_day: str) -> list[sqlite3.Row]:
    """Every (bundle id, version, metric, key) summed over the days from ``since_day``: count and value sum
    (``/metrics``)."""
    return conn.execute(
        "SELECT bundle_id, bundle_version, metric, key, SUM(count) AS n, SUM(value_sum) AS s FROM bundle_stats"
        " WHERE day >= ? GROUP BY bundle_id, bundle_version, metric, key",
        (since_day,),
    ).fetchall()


# -- the daily final snapshot --------------------------------------------------------------------------------------


def days_to_finalise(conn: sqlite3.Connection, today: str) -> list[tuple[str, str, str]]:
    """(bundle id, version, day) of every ended UTC day (before ``today``) with aggregates whose final snapshot
    was not queued yet, oldest first."""
    rows = conn.execute(
        "SELECT DISTINCT s.bundle_id, s.bundle_version, s.day FROM bundle_stats s LEFT JOIN bundle_stats_final f"
        " ON f.bundle_id=s.bundle_id AND f.bundle_version=s.bundle_version AND f.day=s.day"
        " WHERE s.day < ? AND f.day IS NULL ORDER BY s.day, s.bundle_id, s.bundle_version",
        (today,),
    ).fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


def mark_final(conn: sqlite3.Connection, bundle_id: str, version: str, day: str, message_id: str) -> None:
    """Remember that the final snapshot of (bundle version, day) was queued (in the transaction that queued it)."""
    conn.execute(
        "INSERT OR IGNORE INTO bundle_stats_final(bundle_id, bundle_version, day, message_id, queued_at)"
        " VALUES (?,?,?,?,?)",
        (bundle_id, version, day, message_id, time.time()),
    )


# -- drift ---------------------------------------------------------------------------------------------------------


def window_days(today: str, n: int) -> list[str]:
    """The ``n`` UTC days ending with ``today`` (``YYYY-MM-DD``), oldest first."""
    end = dt.date.fromisoformat(today)
    return [(end - dt.timedelta(days=i)).isoformat() for i in range(n - 1, -1, -1)]


def evaluate_drift(conn: sqlite3.Connection, manifest: Manifest, today: str | None = None) -> dict[str, Any]:
    """Compare the bundle version's last ``drift.window_days`` UTC days with the manifest's ``reference`` and
    keep the result in ``bundle_drift`` (in the caller's transaction). Returns metric -> {psi, p_value, test,
    alert}; empty (and the stored evaluation cleared) without a reference or before ``min_studies`` studies in
    the window. Metrics: ``score:<label>`` for each label of the reference, ``study_score``, ``input_mean``,
    ``input_p95`` (``engines.drift.compare``)."""
    ref = manifest.reference
    ident = (manifest.bundle_id, manifest.version)
    if ref is None:
        conn.execute("DELETE FROM bundle_drift WHERE bundle_id=? AND bundle_version=?", ident)
        return {}
    policy = manifest.drift_policy
    window = counts(conn, *ident, window_days(today or utc_day(), policy.window_days))
    if window["studies"] < policy.min_studies:
        conn.execute("DELETE FROM bundle_drift WHERE bundle_id=? AND bundle_version=?", ident)
        return {}
    pairs: list[tuple[str, list[int], list[int]]] = [
        (f"score:{label}", ref_counts, window["scores"].get(label, [0] * drift.N_BINS))
        for label, ref_counts in sorted(ref.scores.items())
    ]
    pairs += [
        ("study_score", ref.study_score, window["study_score"]),
        ("input_mean", ref.input_mean, window["input_mean"]),
        ("input_p95", ref.input_p95, window["input_p95"]),
    ]
    out: dict[str, Any] = {}
    t = time.time()
    for metric, expected, actual in pairs:
        if sum(actual) == 0:
            continue
        res = drift.compare(expected, actual, policy.psi_alert, policy.p_alert)
        out[metric] = res
        conn.execute(
            "INSERT INTO bundle_drift(bundle_id, bundle_version, metric, psi, p_value, test, alert, studies,"
            " window_days, evaluated_at) VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(bundle_id, bundle_version, metric)"
            " DO UPDATE SET psi=excluded.psi, p_value=excluded.p_value, test=excluded.test, alert=excluded.alert,"
            " studies=excluded.studies, window_days=excluded.window_days, evaluated_at=excluded.evaluated_at",
            (
                *ident,
                metric,
                res["psi"],
                res["p_value"],
                res["test"],
                int(res["alert"]),
                window["studies"],
                policy.window_days,
                t,
            ),
        )
    return out


def drift_report(conn: sqlite3.Connection, active: Iterable[tuple[str, str]] | None = None) -> dict[str, Any]:
    """``{"<bundle id>@<version>": {"alert": bool, "studies", "window_days", "metrics": {metric: {psi, p_value,
    test, alert}}}}`` of the latest evaluations (only the ``active`` bundle versions when given): the twin's
    reported ``drift`` property, the dashboard banner and ``appliance status``."""
    rows = conn.execute("SELECT * FROM bundle_drift ORDER BY bundle_id, bundle_version, metric").fetchall()
    wanted = set(active) if active is not None else None
    out: dict[str, Any] = {}
    for r in rows:
        if wanted is not None and (r["bundle_id"], r["bundle_version"]) not in wanted:
            continue
        entry = out.setdefault(
            f"{r['bundle_id']}@{r['bundle_version']}",
            {"alert": False, "studies": r["studies"], "window_days": r["window_days"], "metrics": {}},
        )
        entry["metrics"][r["metric"]] = {
            "psi": r["psi"],
            "p_value": r["p_value"],
            "test": r["test"],
            "alert": bool(r["alert"]),
        }
        entry["alert"] = entry["alert"] or bool(r["alert"])
    return out


def drift_alerts(conn: sqlite3.Connection, active: Iterable[tuple[str, str]] | None = None) -> list[str]:
    """One line per bundle version whose window drifted: ``"<bundle>@<version>: score:nodule PSI 0.41 p 1e-05,
    ..."`` (no patient data)."""
    lines = []
    for name, entry in drift_report(conn, active).items():
        if entry["alert"]:
            bad = [
                f"{metric} PSI {m['psi']:.2f} p {m['p_value']:.2g}"
                for metric, m in entry["metrics"].items()
                if m["alert"]
            ]
            lines.append(f"{name}: {', '.join(bad)} (last {entry['window_days']} days, {entry['studies']} studies)")
    return lines
