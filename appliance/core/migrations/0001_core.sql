-- Studies: one row per (study, revision). A late instance after completion opens a new revision.
CREATE TABLE studies (
    id INTEGER PRIMARY KEY,
    study_uid TEXT NOT NULL,
    revision INTEGER NOT NULL DEFAULT 1,
    state TEXT NOT NULL,
    detail TEXT,
    modality TEXT,
    calling_ae TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    last_instance_at REAL NOT NULL,
    assoc_open INTEGER NOT NULL DEFAULT 0,
    completed_at REAL,
    UNIQUE (study_uid, revision)
);
CREATE INDEX studies_state ON studies(state);
CREATE INDEX studies_uid ON studies(study_uid);

-- Instances: the received bytes live in the spool; sha256 distinguishes revisions of one SOP UID.
CREATE TABLE instances (
    id INTEGER PRIMARY KEY,
    study_id INTEGER NOT NULL REFERENCES studies(id),
    study_uid TEXT NOT NULL,
    series_uid TEXT,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    modality TEXT,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    calling_ae TEXT,
    flags TEXT,
    received_at REAL NOT NULL,
    UNIQUE (sop_instance_uid, sha256)
);
CREATE INDEX instances_study ON instances(study_id);
CREATE INDEX instances_sop ON instances(sop_instance_uid);

-- History of every state transition (who moved what, when, why).
CREATE TABLE study_events (
    id INTEGER PRIMARY KEY,
    study_id INTEGER NOT NULL REFERENCES studies(id),
    from_state TEXT,
    to_state TEXT NOT NULL,
    at REAL NOT NULL,
    detail TEXT
);
CREATE INDEX study_events_study ON study_events(study_id)
