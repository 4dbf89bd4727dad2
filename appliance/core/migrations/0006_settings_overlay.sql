-- The runtime overlay of cloud settings applied from the twin's desired properties (appliance/cloud/overlay.py
-- is the only writer): one row, the validated desired document and its $version.
CREATE TABLE settings_overlay (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL,
    doc TEXT NOT NULL,
    applied_at REAL NOT NULL
);
-- Earlier builds kept the applied document in cloud_state ('twin.applied_doc'): carried over once, then dropped.
INSERT INTO settings_overlay(id, version, doc, applied_at)
    SELECT 1, COALESCE((SELECT CAST(value AS INTEGER) FROM cloud_state WHERE key = 'twin.desired_version'), 0),
           value, updated_at
    FROM cloud_state WHERE key = 'twin.applied_doc' AND value NOT IN ('null', '');
DELETE FROM cloud_state WHERE key = 'twin.applied_doc'
