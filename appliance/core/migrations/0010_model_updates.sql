-- Over-the-air model updates (appliance/updates/state.py is the only writer of both tables).
-- One row per bundle id the director named: the version it should run, the step the update is at (persisted
-- BEFORE the step runs, so a restart resumes or ends it) and the health-gate bookkeeping.
CREATE TABLE model_updates (
    bundle_id TEXT PRIMARY KEY,
    target TEXT NOT NULL,
    state TEXT NOT NULL,
    bytes INTEGER NOT NULL DEFAULT 0,
    total INTEGER,
    reason TEXT,
    since REAL NOT NULL,
    policy TEXT NOT NULL DEFAULT '{}',
    from_version TEXT,
    health_deadline REAL,
    health_ok INTEGER NOT NULL DEFAULT 0,
    selfcheck_done INTEGER NOT NULL DEFAULT 0
);
-- The highest version ever installed per bundle id: the floor below which no update may go (anti-rollback,
-- survives removal of old versions from the models directory).
CREATE TABLE model_update_highest (
    bundle_id TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    recorded_at REAL NOT NULL
);
