-- Radiologists' feedback on results (appliance/worklist/feedback.py, the table's only writer): one row per
-- verdict or outcome given; a changed verdict is a new row with the next revision (the history stays), the
-- newest revision of each (result, kind, label) is in force. label is '' for an outcome (a whole-study fact).
-- No PHI: the actor is a dashboard user name, the rest are labels, codes and ids.
CREATE TABLE feedback (
    id INTEGER PRIMARY KEY,
    study_id INTEGER NOT NULL REFERENCES studies(id),
    result_id INTEGER NOT NULL REFERENCES results(id),
    bundle_id TEXT NOT NULL,
    bundle_version TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('finding', 'outcome')),
    label TEXT NOT NULL DEFAULT '',
    verdict TEXT CHECK (verdict IN ('agree', 'disagree', 'uncertain')),
    outcome_code TEXT,
    outcome_positive INTEGER CHECK (outcome_positive IN (0, 1)),
    revision INTEGER NOT NULL CHECK (revision >= 1),
    actor TEXT NOT NULL,
    role TEXT NOT NULL,
    given_at REAL NOT NULL,
    message_id TEXT,
    CHECK ((kind = 'finding' AND verdict IS NOT NULL AND outcome_code IS NULL AND label != '')
        OR (kind = 'outcome' AND verdict IS NULL AND outcome_code IS NOT NULL AND outcome_positive IS NOT NULL
            AND label = '')),
    UNIQUE (result_id, kind, label, revision)
);
CREATE INDEX feedback_study ON feedback(study_id);

-- The newest site operating point ever accepted per bundle (appliance/cloud/overlay.py): JSON
-- {bundle_id: [version, canonical content]}; an older one is refused even after the twin stopped naming one.
ALTER TABLE settings_overlay ADD COLUMN operating_points_newest TEXT;

-- The outbox takes two more kinds of message (/work/CENTRAL_SCHEMA.md): 'feedback' (radiologists' verdicts and
-- outcomes) and 'stats' (daily aggregates). SQLite cannot change a CHECK in place: the table is rebuilt with the
-- same columns, rows, indexes and totals triggers, and its AUTOINCREMENT counter is carried over so no message
-- sequence number is ever used twice. (Trigger bodies stay on one line: the runner splits on ";\n".)
CREATE TABLE outbox_seq_keep AS SELECT seq FROM sqlite_sequence WHERE name = 'outbox';
CREATE TABLE outbox_rebuilt (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL CHECK (kind IN ('result', 'health', 'audit', 'feedback', 'stats')),
    priority INTEGER NOT NULL,
    body BLOB NOT NULL,
    props TEXT NOT NULL DEFAULT '{}',
    size INTEGER NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0
);
INSERT INTO outbox_rebuilt(seq, message_id, kind, priority, body, props, size, created_at, expires_at, attempts)
    SELECT seq, message_id, kind, priority, body, props, size, created_at, expires_at, attempts FROM outbox;
DROP TABLE outbox;
ALTER TABLE outbox_rebuilt RENAME TO outbox;
DELETE FROM sqlite_sequence WHERE name = 'outbox';
INSERT INTO sqlite_sequence(name, seq) SELECT 'outbox', MAX(COALESCE((SELECT MAX(seq) FROM outbox_seq_keep), 0), COALESCE((SELECT MAX(seq) FROM outbox), 0));
DROP TABLE outbox_seq_keep;
CREATE INDEX outbox_order ON outbox(priority DESC, seq);
CREATE INDEX outbox_kind ON outbox(kind, seq);
CREATE INDEX outbox_expiry ON outbox(expires_at);
CREATE TRIGGER outbox_totals_ins AFTER INSERT ON outbox BEGIN UPDATE outbox_totals SET count = count + 1, bytes = bytes + NEW.size WHERE id = 1; END;
CREATE TRIGGER outbox_totals_del AFTER DELETE ON outbox BEGIN UPDATE outbox_totals SET count = count - 1, bytes = bytes - OLD.size WHERE id = 1; END
