"""The central report's SQL: every query the report runs, in the one text both engines execute.

The same statements run on DuckDB (:mod:`appliance.central.report_engine`, the embedded default) and on Spark SQL
(:mod:`appliance.central.spark_job`). They are written in the subset the two dialects share, so no query is
rewritten per engine; what differs between the engines is handled in :data:`DIALECT` (the one place), and the
engines are set up so the rest agrees:

- both sessions run in UTC (DuckDB ``SET TimeZone='UTC'``, Spark ``spark.sql.session.timeZone=UTC``), so
  ``CAST(ts AS DATE)`` and ``date_trunc('week', ts)`` (ISO week: Monday 00:00) give the UTC date / week;
- no parameters (DuckDB marks them ``$name``, Spark ``:name``, and neither allows them in a view): the filters
  and the constant tables (score bins, candidate thresholds, references) are small registered tables
  (:data:`CONSTANT_TABLES`), and each query reads them;
- no decimal literals in arithmetic (DuckDB would type them DECIMAL, Spark DOUBLE): every ratio is
  ``CAST(a AS DOUBLE) / NULLIF(b, 0)``, which is NULL for an empty denominator in both engines (Spark 4 runs
  in ANSI mode, where ``x / 0`` raises);
- quantiles are ``percentile_cont(p) WITHIN GROUP (ORDER BY x)``: exact, linear interpolation between the closest
  ranks (numpy's default ``linear`` method) in both engines;
- joins on the site, which may be NULL (no twin tag), use ``IS NOT DISTINCT FROM``.

Each query returns rows whose column names and order are the report's table (docs/CENTRAL.md, "Reports").
"""

from __future__ import annotations

# Engine-specific spellings; empty while the shared subset suffices. An engine adapter applies its entry
# (old -> new text replacements) to every statement before running it.
DIALECT: dict[str, dict[str, str]] = {"duckdb": {}, "spark": {}}

# PSI: sum over bins of (p - q) * ln(p / q), p and q the two distributions' bin proportions, each floored at
# PSI_EPSILON so that an empty bin contributes a finite amount (no renormalisation after the floor).
PSI_EPSILON = 1e-4

# Column types of the store's tables as the report reads them (the contract in docs/CENTRAL.md; the store's own
# published schema is appliance/central/store_schema.py). Used to stand in an empty table for one the store
# does not (yet) hold, so an empty store gives an empty report, not an error.
STORE_COLUMNS: dict[str, list[tuple[str, str]]] = {
    "results": [
        ("mid", "STRING"),
        ("device", "STRING"),
        ("site", "STRING"),
        ("enqueued_time", "TIMESTAMP"),
        ("bundle_id", "STRING"),
        ("bundle_version", "STRING"),
        ("study_score", "DOUBLE"),
        ("urgent", "BOOLEAN"),
        ("n_images", "INT"),
        ("n_refused", "INT"),
    ],
    "findings": [
        ("mid", "STRING"),
        ("device", "STRING"),
        ("site", "STRING"),
        ("enqueued_time", "TIMESTAMP"),
        ("bundle_id", "STRING"),
        ("bundle_version", "STRING"),
        ("image", "STRING"),
        ("label", "STRING"),
        ("score", "DOUBLE"),
        ("positive", "BOOLEAN"),
    ],
    "stats": [
        ("mid", "STRING"),
        ("device", "STRING"),
        ("site", "STRING"),
        ("bundle_id", "STRING"),
        ("bundle_version", "STRING"),
        ("day", "DATE"),
        ("generated_at", "TIMESTAMP"),
        ("metric", "STRING"),
        ("key", "STRING"),
        ("count", "BIGINT"),
    ],
    "feedback": [
        ("mid", "STRING"),
        ("device", "STRING"),
        ("site", "STRING"),
        ("enqueued_time", "TIMESTAMP"),
        ("bundle_id", "STRING"),
        ("bundle_version", "STRING"),
        ("result_mid", "STRING"),
        ("kind", "STRING"),
        ("label", "STRING"),
        ("verdict", "STRING"),
        ("outcome_positive", "BOOLEAN"),
    ],
}

# Small tables the report registers before its queries (name -> columns); rows come from report.py.
CONSTANT_TABLES: dict[str, list[tuple[str, str]]] = {
    # the filter: one row; a NULL field filters nothing. since/until are inclusive UTC dates.
    "report_filter": [("site", "STRING"), ("since", "DATE"), ("until", "DATE")],
    # the 20 score bins of the stats/v1 edges: left-closed, the last one also closed on the right
    "score_bins": [("bin", "INT"), ("lo", "DOUBLE"), ("hi", "DOUBLE"), ("is_last", "BOOLEAN")],
    # candidate operating points of the calibration table
    "thresholds": [("threshold", "DOUBLE")],
    # reference score histograms per bundle version and label (the manifest's ``reference.scores``)
    "reference_bins": [
        ("bundle_id", "STRING"),
        ("bundle_version", "STRING"),
        ("label", "STRING"),
        ("bin", "INT"),
        ("n", "BIGINT"),
    ],
}

# The filtered views every report query reads (r, f, s, fb), made from the store tables and report_filter.
_SITE = "((SELECT site FROM report_filter) IS NULL OR site = (SELECT site FROM report_filter))"


def _dates(expr: str) -> str:
    return (
        f"((SELECT since FROM report_filter) IS NULL OR {expr} >= (SELECT since FROM report_filter))"
        f" AND ((SELECT until FROM report_filter) IS NULL OR {expr} <= (SELECT until FROM report_filter))"
    )


FILTERED_VIEWS: dict[str, str] = {
    "r": f"SELECT * FROM results WHERE {_SITE} AND {_dates('CAST(enqueued_time AS DATE)')}",
    "f": f"SELECT * FROM findings WHERE {_SITE} AND {_dates('CAST(enqueued_time AS DATE)')}",
    # every site's findings in the date range: the fleet a site is compared with, whatever --site keeps
    "f_fleet": f"SELECT * FROM findings WHERE {_dates('CAST(enqueued_time AS DATE)')}",
    "s": f"SELECT * FROM stats WHERE {_SITE} AND {_dates('day')}",
    # feedback about the results in the report's range (feedback arrives after its result)
    "fb": f"SELECT * FROM feedback WHERE {_SITE} AND result_mid IN (SELECT mid FROM r)",
}

_WEEK = "CAST(date_trunc('week', enqueued_time) AS DATE)"
_KEYS = "site, bundle_id, bundle_version"
_SAME_SITE = "a.site IS NOT DISTINCT FROM b.site AND a.bundle_id = b.bundle_id AND a.bundle_version = b.bundle_version"


def _ratio(num: str, den: str) -> str:
    return f"CAST({num} AS DOUBLE) / NULLIF({den}, 0)"


def _psi(p: str, q: str) -> str:
    """The PSI term of one bin, p and q proportions (SQL expressions)."""
    pe, qe = f"GREATEST({p}, {PSI_EPSILON!r})", f"GREATEST({q}, {PSI_EPSILON!r})"
    return f"({pe} - {qe}) * LN({pe} / {qe})"


VOLUME = f"""
WITH rw AS (SELECT {_KEYS}, {_WEEK} AS week, device, n_images, n_refused, urgent FROM r)
SELECT {_KEYS}, week,
       COUNT(*) AS studies,
       COUNT(DISTINCT device) AS devices,
       SUM(n_images) AS images,
       SUM(n_refused) AS refused_images,
       SUM(CASE WHEN urgent THEN 1 ELSE 0 END) AS urgent
FROM rw GROUP BY {_KEYS}, week
ORDER BY site NULLS FIRST, bundle_id, bundle_version, week
"""

LABELS = f"""
WITH fw AS (SELECT {_KEYS}, {_WEEK} AS week, mid, label, score, positive FROM f)
SELECT {_KEYS}, week, label,
       COUNT(*) AS findings,
       COUNT(DISTINCT mid) AS studies,
       COUNT(DISTINCT CASE WHEN positive THEN mid END) AS positive_studies,
       {_ratio("COUNT(DISTINCT CASE WHEN positive THEN mid END)", "COUNT(DISTINCT mid)")} AS positive_rate,
       AVG(score) AS score_mean,
       percentile_cont(0.05) WITHIN GROUP (ORDER BY score) AS score_p05,
       percentile_cont(0.25) WITHIN GROUP (ORDER BY score) AS score_p25,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY score) AS score_p50,
       percentile_cont(0.75) WITHIN GROUP (ORDER BY score) AS score_p75,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY score) AS score_p95
FROM fw GROUP BY {_KEYS}, week, label
ORDER BY site NULLS FIRST, bundle_id, bundle_version, week, label
"""

# Scores binned into the stats/v1 bins; a score outside [0, 1] (or NaN) falls in no bin and is not counted.
_BINNED = f"""
fw AS (SELECT {_KEYS}, {_WEEK} AS week, label, score FROM f),
binned AS (
  SELECT fw.site, fw.bundle_id, fw.bundle_version, fw.week, fw.label, b.bin
  FROM fw JOIN score_bins b ON fw.score >= b.lo AND (fw.score < b.hi OR (b.is_last AND fw.score <= b.hi))
)"""

SCORE_HISTOGRAMS = f"""
WITH {_BINNED}
SELECT {_KEYS}, label, bin, COUNT(*) AS n
FROM binned GROUP BY {_KEYS}, label, bin
ORDER BY site NULLS FIRST, bundle_id, bundle_version, label, bin
"""

DRIFT = f"""
WITH {_BINNED},
site_bins AS (SELECT {_KEYS}, week, label, bin, COUNT(*) AS n FROM binned GROUP BY {_KEYS}, week, label, bin),
groups AS (SELECT {_KEYS}, week, label, SUM(n) AS total FROM site_bins GROUP BY {_KEYS}, week, label),
fleet_scores AS (SELECT bundle_id, bundle_version, {_WEEK} AS week, label, score FROM f_fleet),
fleet_bins AS (
  SELECT fs.bundle_id, fs.bundle_version, fs.week, fs.label, b.bin, COUNT(*) AS n
  FROM fleet_scores fs JOIN score_bins b ON fs.score >= b.lo AND (fs.score < b.hi OR (b.is_last AND fs.score <= b.hi))
  GROUP BY fs.bundle_id, fs.bundle_version, fs.week, fs.label, b.bin
),
fleet AS (SELECT bundle_id, bundle_version, week, label, SUM(n) AS total FROM fleet_bins
          GROUP BY bundle_id, bundle_version, week, label),
ref AS (SELECT bundle_id, bundle_version, label, SUM(n) AS total FROM reference_bins
        GROUP BY bundle_id, bundle_version, label),
grid AS (
  SELECT g.site, g.bundle_id, g.bundle_version, g.week, g.label, g.total, b.bin,
         COALESCE(sb.n, 0) AS n,
         COALESCE(fb.n, 0) - COALESCE(sb.n, 0) AS other_n,
         fl.total - g.total AS other_total,
         COALESCE(rb.n, 0) AS ref_n,
         rt.total AS ref_total
  FROM groups g
  CROSS JOIN score_bins b
  LEFT JOIN site_bins sb ON sb.site IS NOT DISTINCT FROM g.site AND sb.bundle_id = g.bundle_id
       AND sb.bundle_version = g.bundle_version AND sb.week = g.week AND sb.label = g.label AND sb.bin = b.bin
  LEFT JOIN fleet_bins fb ON fb.bundle_id = g.bundle_id AND fb.bundle_version = g.bundle_version
       AND fb.week = g.week AND fb.label = g.label AND fb.bin = b.bin
  JOIN fleet fl ON fl.bundle_id = g.bundle_id AND fl.bundle_version = g.bundle_version
       AND fl.week = g.week AND fl.label = g.label
  LEFT JOIN reference_bins rb ON rb.bundle_id = g.bundle_id AND rb.bundle_version = g.bundle_version
       AND rb.label = g.label AND rb.bin = b.bin
  LEFT JOIN ref rt ON rt.bundle_id = g.bundle_id AND rt.bundle_version = g.bundle_version AND rt.label = g.label
),
cum AS (
  SELECT grid.*,
         SUM(n) OVER (PARTITION BY {_KEYS}, week, label ORDER BY bin ROWS UNBOUNDED PRECEDING) AS cum_n,
         SUM(other_n) OVER (PARTITION BY {_KEYS}, week, label ORDER BY bin ROWS UNBOUNDED PRECEDING) AS cum_other,
         SUM(ref_n) OVER (PARTITION BY {_KEYS}, week, label ORDER BY bin ROWS UNBOUNDED PRECEDING) AS cum_ref
  FROM grid
)
SELECT {_KEYS}, week, label,
       MIN(total) AS n,
       MIN(ref_total) AS reference_n,
       CASE WHEN MIN(ref_total) > 0
            THEN SUM({_psi(_ratio("n", "total"), _ratio("ref_n", "ref_total"))}) END AS psi_reference,
       MIN(other_total) AS fleet_n,
       CASE WHEN MIN(other_total) > 0
            THEN SUM({_psi(_ratio("n", "total"), _ratio("other_n", "other_total"))}) END AS psi_fleet,
       CASE WHEN MIN(ref_total) > 0
            THEN MAX(ABS({_ratio("cum_n", "total")} - {_ratio("cum_ref", "ref_total")})) END AS ks_d_reference,
       CASE WHEN MIN(other_total) > 0
            THEN MAX(ABS({_ratio("cum_n", "total")} - {_ratio("cum_other", "other_total")})) END AS ks_d_fleet
FROM cum GROUP BY {_KEYS}, week, label
ORDER BY site NULLS FIRST, bundle_id, bundle_version, week, label
"""

# Refusals by reason from the box's stats: of each (device, bundle version, day) only the newest snapshot
# (latest generated_at; the message id breaks a tie) counts. rate = refused / the same snapshots' images.
REFUSALS = f"""
WITH snap AS (SELECT DISTINCT device, bundle_id, bundle_version, day, mid, generated_at FROM s),
newest AS (
  SELECT mid FROM (
    SELECT mid, ROW_NUMBER() OVER (PARTITION BY device, bundle_id, bundle_version, day
                                   ORDER BY generated_at DESC, mid DESC) AS rn
    FROM snap) t
  WHERE rn = 1
),
cur AS (SELECT {_KEYS}, CAST(date_trunc('week', day) AS DATE) AS week, metric, key, count
        FROM s WHERE mid IN (SELECT mid FROM newest)),
images AS (SELECT {_KEYS}, week, SUM(count) AS images FROM cur WHERE metric = 'count:images'
           GROUP BY {_KEYS}, week),
refused AS (SELECT {_KEYS}, week, key AS reason, SUM(count) AS refused FROM cur WHERE metric = 'refusals'
            GROUP BY {_KEYS}, week, key)
SELECT a.site, a.bundle_id, a.bundle_version, a.week, a.reason, a.refused, b.images,
       {_ratio("a.refused", "b.images")} AS rate
FROM refused a LEFT JOIN images b ON {_SAME_SITE} AND a.week = b.week
ORDER BY a.site NULLS FIRST, a.bundle_id, a.bundle_version, a.week, a.reason
"""

# One row per (result, label): the study's score for the label (the highest of its images), whether the box
# called it positive, the radiologist's newest verdict and the newest confirmed outcome. An outcome given
# without a label is about the study as a whole: it is judged against the pseudo-label "(study)", whose score is
# the result's study_score and which is positive when any finding of the study is.
_JUDGED = f"""
sl AS (
  SELECT {_KEYS}, mid, label, MIN({_WEEK}) AS week, MAX(score) AS score,
         MAX(CASE WHEN positive THEN 1 ELSE 0 END) AS ai_positive
  FROM f GROUP BY {_KEYS}, mid, label
),
study AS (
  SELECT r.site, r.bundle_id, r.bundle_version, r.mid, '(study)' AS label,
         CAST(date_trunc('week', r.enqueued_time) AS DATE) AS week, r.study_score AS score,
         COALESCE(p.ai_positive, 0) AS ai_positive
  FROM r LEFT JOIN (SELECT mid, MAX(ai_positive) AS ai_positive FROM sl GROUP BY mid) p ON p.mid = r.mid
),
units AS (SELECT * FROM sl UNION ALL SELECT * FROM study),
verdicts AS (
  SELECT result_mid, label, verdict FROM (
    SELECT result_mid, label, verdict,
           ROW_NUMBER() OVER (PARTITION BY result_mid, label ORDER BY enqueued_time DESC, mid DESC) AS rn
    FROM fb WHERE kind = 'finding' AND label IS NOT NULL AND verdict IS NOT NULL) t
  WHERE rn = 1
),
outcomes AS (
  SELECT result_mid, label, outcome_positive FROM (
    SELECT result_mid, COALESCE(label, '(study)') AS label, outcome_positive,
           ROW_NUMBER() OVER (PARTITION BY result_mid, COALESCE(label, '(study)')
                              ORDER BY enqueued_time DESC, mid DESC) AS rn
    FROM fb WHERE kind = 'outcome' AND outcome_positive IS NOT NULL) t
  WHERE rn = 1
),
judged AS (
  SELECT u.site, u.bundle_id, u.bundle_version, u.week, u.label, u.score, u.ai_positive, v.verdict,
         o.outcome_positive,
         CASE WHEN o.outcome_positive IS NOT NULL THEN (CASE WHEN o.outcome_positive THEN 1 ELSE 0 END)
              WHEN v.verdict = 'agree' THEN u.ai_positive
              WHEN v.verdict = 'disagree' THEN 1 - u.ai_positive END AS truth
  FROM units u
  LEFT JOIN verdicts v ON v.result_mid = u.mid AND v.label = u.label
  LEFT JOIN outcomes o ON o.result_mid = u.mid AND o.label = u.label
)"""

CONCORDANCE = f"""
WITH {_JUDGED},
sums AS (
  SELECT {_KEYS}, week, label,
         SUM(CASE WHEN verdict = 'agree' THEN 1 ELSE 0 END) AS agree,
         SUM(CASE WHEN verdict = 'disagree' THEN 1 ELSE 0 END) AS disagree,
         SUM(CASE WHEN verdict = 'uncertain' THEN 1 ELSE 0 END) AS uncertain,
         SUM(CASE WHEN ai_positive = 1 AND verdict IN ('agree', 'disagree') THEN 1 ELSE 0 END) AS positives_judged,
         SUM(CASE WHEN ai_positive = 1 AND verdict = 'agree' THEN 1 ELSE 0 END) AS positives_agreed,
         SUM(CASE WHEN outcome_positive IS NOT NULL THEN 1 ELSE 0 END) AS outcomes,
         SUM(CASE WHEN outcome_positive THEN 1 ELSE 0 END) AS outcomes_positive,
         SUM(CASE WHEN outcome_positive AND ai_positive = 1 THEN 1 ELSE 0 END) AS outcomes_positive_flagged
  FROM judged GROUP BY {_KEYS}, week, label
)
SELECT {_KEYS}, week, label, agree, disagree, uncertain,
       {_ratio("agree", "agree + disagree")} AS agreement_rate,
       positives_judged, positives_agreed,
       {_ratio("positives_agreed", "positives_judged")} AS ppv,
       outcomes, outcomes_positive, outcomes_positive_flagged,
       {_ratio("outcomes_positive_flagged", "outcomes_positive")} AS sensitivity
FROM sums WHERE agree + disagree + uncertain + outcomes > 0
ORDER BY site NULLS FIRST, bundle_id, bundle_version, week, label
"""

# At each candidate threshold t a study is referred when its score >= t (the box's rule: positive = score >=
# threshold). Truth: the confirmed outcome where there is one, else the radiologist's verdict on the box's call.
CALIBRATION = f"""
WITH {_JUDGED},
counts AS (
  SELECT j.site, j.bundle_id, j.bundle_version, j.label, t.threshold,
         COUNT(*) AS studies,
         SUM(CASE WHEN j.score >= t.threshold THEN 1 ELSE 0 END) AS referred,
         SUM(CASE WHEN j.truth IS NOT NULL THEN 1 ELSE 0 END) AS with_truth,
         SUM(CASE WHEN j.truth = 1 AND j.score >= t.threshold THEN 1 ELSE 0 END) AS tp,
         SUM(CASE WHEN j.truth = 0 AND j.score >= t.threshold THEN 1 ELSE 0 END) AS fp,
         SUM(CASE WHEN j.truth = 1 AND NOT (j.score >= t.threshold) THEN 1 ELSE 0 END) AS fn,
         SUM(CASE WHEN j.truth = 0 AND NOT (j.score >= t.threshold) THEN 1 ELSE 0 END) AS tn
  FROM judged j CROSS JOIN thresholds t
  GROUP BY j.site, j.bundle_id, j.bundle_version, j.label, t.threshold
)
SELECT {_KEYS}, label, threshold, studies, with_truth, tp, fp, fn, tn,
       {_ratio("tp", "tp + fn")} AS sensitivity,
       {_ratio("tn", "tn + fp")} AS specificity,
       {_ratio("tp", "tp + fp")} AS ppv,
       {_ratio("tn", "tn + fn")} AS npv,
       {_ratio("referred", "studies")} AS referral_rate
FROM counts
ORDER BY site NULLS FIRST, bundle_id, bundle_version, label, threshold
"""

# The report's tables, in the order they are documented and shown.
QUERIES: dict[str, str] = {
    "volume": VOLUME,
    "labels": LABELS,
    "drift": DRIFT,
    "score_histograms": SCORE_HISTOGRAMS,
    "refusals": REFUSALS,
    "concordance": CONCORDANCE,
    "calibration": CALIBRATION,
}


def for_engine(sql: str, engine: str) -> str:
    """``sql`` in ``engine``'s dialect ("duckdb" or "spark"): :data:`DIALECT`'s replacements applied."""
    for old, new in DIALECT[engine].items():
        sql = sql.replace(old, new)
    return sql


def empty_select(columns: list[tuple[str, str]]) -> str:
    """A SELECT of no rows with these typed columns (a stand-in for a table the store does not hold)."""
    cols = ", ".join(f"CAST(NULL AS {typ}) AS {name}" for name, typ in columns)
    return f"SELECT {cols} WHERE 1 = 0"
