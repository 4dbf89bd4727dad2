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
-- The outbox takes two more kinds (issue 17): "stats" (this migration's aggregates) and "feedback" (radiologists'
-- verdicts). SQLite cannot change a CHECK constraint in place: the table is rebuilt with its rows, indexes and
-- triggers (https://www.sqlite.org/lang_altertable.html, "making other kinds of table schema changes").
CREATE TABLE outbox_new (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL CHECK (kind IN ('result', 'health', 'audit', 'stats', 'feedback')),
    priority INTEGER NOT NULL,
    body BLOB NOT NULL,
    props TEXT NOT NULL DEFAULT '{}',
    size INTEGER NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0
);
INSERT INTO outbox_new(seq, message_id, kind, priority, body, props, size, created_at, expires_at, attempts) SELECT seq, message_id, kind, priority, body, props, size, created_at, expires_at, attempts FROM outbox;
-- keep AUTOINCREMENT's high-water mark: a sequence number is never handed out twice
DELETE FROM sqlite_sequence WHERE name = 'outbox_new';
INSERT INTO sqlite_sequence(name, seq) SELECT 'outbox_new', seq FROM sqlite_sequence WHERE name = 'outbox';
DROP TABLE outbox;
ALTER TABLE outbox_new RENAME TO outbox;
CREATE INDEX outbox_order ON outbox(priority DESC, seq);
CREATE INDEX outbox_kind ON outbox(kind, seq);
CREATE INDEX outbox_expiry ON outbox(expires_at);
CREATE TRIGGER outbox_totals_ins AFTER INSERT ON outbox BEGIN UPDATE outbox_totals SET count = count + 1, bytes = bytes + NEW.size WHERE id = 1; END;
CREATE TRIGGER outbox_totals_del AFTER DELETE ON outbox BEGIN UPDATE outbox_totals SET count = count - 1, bytes = bytes - OLD.size WHERE id = 1; END
