-- Cloud outbox: every message for IoT Hub waits here until the hub's PUBACK; one row per message id.
-- Sent in (priority DESC, seq) order; seq is monotonic (AUTOINCREMENT never reuses ids).
CREATE TABLE outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL CHECK (kind IN ('result', 'health', 'audit')),
    priority INTEGER NOT NULL,
    body BLOB NOT NULL,
    props TEXT NOT NULL DEFAULT '{}',
    size INTEGER NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX outbox_order ON outbox(priority DESC, seq);
CREATE INDEX outbox_kind ON outbox(kind, seq);
CREATE INDEX outbox_expiry ON outbox(expires_at);

-- Running totals kept by triggers so the disk budget check is O(1) inside the caller's transaction.
CREATE TABLE outbox_totals (id INTEGER PRIMARY KEY CHECK (id = 1), count INTEGER NOT NULL, bytes INTEGER NOT NULL);
INSERT INTO outbox_totals(id, count, bytes) VALUES (1, 0, 0);
-- (trigger bodies stay on one line: the migration runner splits statements on ";\n")
CREATE TRIGGER outbox_totals_ins AFTER INSERT ON outbox BEGIN UPDATE outbox_totals SET count = count + 1, bytes = bytes + NEW.size WHERE id = 1; END;
CREATE TRIGGER outbox_totals_del AFTER DELETE ON outbox BEGIN UPDATE outbox_totals SET count = count - 1, bytes = bytes - OLD.size WHERE id = 1; END;

-- What left the outbox and why: 'sent' (PUBACK), 'expired' (TTL), 'evicted' (disk budget).
CREATE TABLE outbox_log (
    id INTEGER PRIMARY KEY,
    message_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    size INTEGER NOT NULL,
    outcome TEXT NOT NULL CHECK (outcome IN ('sent', 'expired', 'evicted')),
    created_at REAL NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX outbox_log_mid ON outbox_log(message_id);
CREATE INDEX outbox_log_at ON outbox_log(at);

-- Small durable key/value state of the cloud agent (applied desired properties and their $version ...).
CREATE TABLE cloud_state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated_at REAL NOT NULL
)
