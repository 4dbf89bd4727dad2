-- Per bundle version and UTC day: the de-identified aggregates the box keeps of its own inputs and outputs
-- (appliance/models/stats.py is the only writer of the three tables). Long form, as the central store's
-- `stats` table: metric "score:<label>" / "study_score" / "input_mean" / "input_p95" (key = bin index 0..19,
-- value_sum = sum of the values in that bin, for Prometheus' _sum), "positives:<label>", "count:studies",
-- "count:images", "count:not_analysed" (key ""), "inputs:<name>" (key = the value seen), "refusals" (key = the
-- refusal category).
CREATE TABLE bundle_stats (
    bundle_id TEXT NOT NULL,
    bundle_version TEXT NOT NULL,
    day TEXT NOT NULL,
    metric TEXT NOT NULL,
    key TEXT NOT NULL,
    count INTEGER NOT NULL CHECK (count >= 0),
    value_sum REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (bundle_id, bundle_version, day, metric, key)
) WITHOUT ROWID;
CREATE INDEX bundle_stats_day ON bundle_stats(day);
-- The final (day-complete) snapshot of each (bundle version, day) queued for the cloud, so it goes once.
CREATE TABLE bundle_stats_final (
    bundle_id TEXT NOT NULL,
    bundle_version TEXT NOT NULL,
    day TEXT NOT NULL,
    message_id TEXT NOT NULL,
    queued_at REAL NOT NULL,
    PRIMARY KEY (bundle_id, bundle_version, day)
) WITHOUT ROWID;
-- The latest drift evaluation of each bundle version and metric against its manifest's signed reference.
CREATE TABLE bundle_drift (
    bundle_id TEXT NOT NULL,
    bundle_version TEXT NOT NULL,
    metric TEXT NOT NULL,
    psi REAL NOT NULL,
    p_value REAL NOT NULL,
    test TEXT NOT NULL,
    alert INTEGER NOT NULL,
    studies INTEGER NOT NULL,
    window_days INTEGER NOT NULL,
    evaluated_at REAL NOT NULL,
    PRIMARY KEY (bundle_id, bundle_version, metric)
) WITHOUT ROWID;
-- (The outbox's CHECK takes 'stats' since migration 0014, which rebuilt it for 'stats' and 'feedback'.)
