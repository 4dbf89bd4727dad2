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
ALTER TABLE settings_overlay ADD COLUMN operating_points_newest TEXT
