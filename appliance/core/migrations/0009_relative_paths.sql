-- Result paths are stored relative to the state directory (the folder of state.db), so a restored or moved state
-- directory never makes retention delete the wrong place. state_relpath() is registered by appliance/core/store.py:
-- it gives the path relative to the state directory, or NULL when the stored path lies outside it (e.g. written
-- from a hostile Study Instance UID by an earlier build). Such rows are flagged, kept, and their files never deleted.
ALTER TABLE results ADD COLUMN dir_outside INTEGER NOT NULL DEFAULT 0;
ALTER TABLE result_objects ADD COLUMN path_outside INTEGER NOT NULL DEFAULT 0;
UPDATE results SET dir_outside = 1 WHERE state_relpath(dir) IS NULL;
UPDATE results SET dir = state_relpath(dir) WHERE dir_outside = 0;
UPDATE result_objects SET path_outside = 1 WHERE state_relpath(path) IS NULL;
UPDATE result_objects SET path = state_relpath(path) WHERE path_outside = 0
