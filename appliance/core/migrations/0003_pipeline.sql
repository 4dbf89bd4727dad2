-- Results of one bundle on one study revision: the findings JSON (summary) and where the files are.
CREATE TABLE results (
    id INTEGER PRIMARY KEY,
    study_id INTEGER NOT NULL REFERENCES studies(id),
    study_uid TEXT NOT NULL,
    bundle_id TEXT NOT NULL,
    bundle_version TEXT NOT NULL,
    summary TEXT NOT NULL,
    study_score REAL,
    dir TEXT NOT NULL,
    timings TEXT,
    created_at REAL NOT NULL,
    UNIQUE (study_id, bundle_id, bundle_version)
);
CREATE INDEX results_study ON results(study_id);

-- The DICOM objects a result produced (one SR per study and bundle, one SC per analysed image).
CREATE TABLE result_objects (
    id INTEGER PRIMARY KEY,
    result_id INTEGER NOT NULL REFERENCES results(id),
    kind TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    UNIQUE (result_id, sop_instance_uid)
);

-- Durable export queue: one row per (object, destination); retried with exponential backoff until the
-- destination answers success, then marked done (never sent again).
CREATE TABLE exports (
    id INTEGER PRIMARY KEY,
    object_id INTEGER NOT NULL REFERENCES result_objects(id),
    study_id INTEGER NOT NULL REFERENCES studies(id),
    destination TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    created_at REAL NOT NULL,
    done_at REAL,
    UNIQUE (object_id, destination)
);
CREATE INDEX exports_due ON exports(state, next_attempt_at);
CREATE INDEX exports_study ON exports(study_id)
