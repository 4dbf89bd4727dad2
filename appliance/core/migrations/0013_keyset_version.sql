-- The newest recipient key set the box ever accepted (appliance/cloud/overlay.py, the table's only writer): an
-- older signed set, or the same version with other keys, is refused even after the overlay stopped naming one.
ALTER TABLE settings_overlay ADD COLUMN keyset_version INTEGER NOT NULL DEFAULT 0;
ALTER TABLE settings_overlay ADD COLUMN keyset_content TEXT
