-- The audit trail (appliance/core/audit.py is the only writer): append-only, hash-chained entries, and one
-- anchor row holding the last entry's seq and hash (written in the same transaction as each entry) so a
-- truncated tail is detectable. The trail holds no PHI and is never purged by retention.
CREATE TABLE audit_log (
    seq INTEGER PRIMARY KEY,
    time TEXT NOT NULL,
    event TEXT NOT NULL,
    actor TEXT NOT NULL,
    outcome TEXT NOT NULL,
    subject TEXT,
    source_ip TEXT,
    detail TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX audit_log_time ON audit_log(time);
CREATE INDEX audit_log_event ON audit_log(event, time);
CREATE TABLE audit_anchor (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last_seq INTEGER NOT NULL,
    last_hash TEXT NOT NULL
);
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER audit_anchor_no_delete BEFORE DELETE ON audit_anchor BEGIN SELECT RAISE(ABORT, 'audit_anchor is append-only'); END;
CREATE TRIGGER audit_anchor_forward_only BEFORE UPDATE ON audit_anchor WHEN NEW.last_seq <= OLD.last_seq BEGIN SELECT RAISE(ABORT, 'audit_anchor only moves forward'); END
