-- 0001: the core queue. Times are Unix epoch milliseconds (INTEGER).
-- A producer may insert with plain SQL:
--   INSERT INTO messages (topic, account, payload) VALUES ('customer.updated', 'acme', '{"id":42}');
-- Every other column has a default; the dispatcher routes the row into deliveries.

CREATE TABLE messages (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    -- Stable id sent as `webhook-id`, the same on every retry.
    uid          TEXT    NOT NULL DEFAULT ('msg_' || lower(hex(randomblob(12)))),
    topic        TEXT    NOT NULL CHECK (length(topic) > 0),
    account      TEXT    NOT NULL CHECK (length(account) > 0),
    payload      TEXT    NOT NULL CHECK (json_valid(payload)),
    priority     INTEGER NOT NULL DEFAULT 0,
    created_at   INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)),
    -- Not delivered before this time (NULL: at once).
    available_at INTEGER,
    -- A second message with the same key is not inserted.
    dedup_key    TEXT,
    -- Dispatcher bookkeeping, not producer data: when the router made its deliveries.
    routed_at    INTEGER
);
CREATE UNIQUE INDEX messages_dedup ON messages (dedup_key) WHERE dedup_key IS NOT NULL;
CREATE INDEX messages_unrouted ON messages (id) WHERE routed_at IS NULL;

-- What a producer wrote never changes; only routed_at is the dispatcher's.
CREATE TRIGGER messages_immutable
BEFORE UPDATE OF id, uid, topic, account, payload, priority, created_at, available_at, dedup_key ON messages
BEGIN
    SELECT RAISE(ABORT, 'messages are immutable');
END;

-- Which endpoint subscribes to which topic; rewritten from the config by each run.
CREATE TABLE subscriptions (
    topic    TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    PRIMARY KEY (topic, endpoint)
) WITHOUT ROWID;

-- One message to one endpoint, always in exactly one state.
CREATE TABLE deliveries (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id       INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    endpoint         TEXT    NOT NULL,
    account          TEXT    NOT NULL,
    state            TEXT    NOT NULL CHECK (state IN ('ready', 'delayed', 'leased', 'delivered', 'dead')),
    priority         INTEGER NOT NULL,
    -- delayed: when it becomes eligible again; otherwise when it last changed queue.
    not_before       INTEGER NOT NULL,
    -- Why it is delayed: scheduled, retry_backoff (later: account_budget, endpoint_saturated).
    reason           TEXT,
    lease_owner      TEXT,
    lease_expires_at INTEGER,
    attempts         INTEGER NOT NULL DEFAULT 0,
    last_status      INTEGER,
    last_error       TEXT,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    UNIQUE (message_id, endpoint)
);
-- Leasing the next ready delivery is a seek on (state = 'ready') and the first entry in
-- (priority DESC, id) order: no scan, no sort, whatever the backlog.
CREATE INDEX deliveries_queue ON deliveries (state, priority DESC, id);
-- Promoting delayed deliveries whose time has come.
CREATE INDEX deliveries_due ON deliveries (state, not_before);

-- One row per try.
CREATE TABLE attempts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    delivery_id INTEGER NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    number      INTEGER NOT NULL,
    run_id      INTEGER,
    pid         INTEGER NOT NULL,
    lease_owner TEXT    NOT NULL,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER,
    -- in_flight, delivered, handed_over, retry, dead, child_died, lease_expired, lease_lost
    outcome     TEXT    NOT NULL DEFAULT 'in_flight',
    http_status INTEGER,
    error       TEXT,
    duration_ms INTEGER
);
CREATE INDEX attempts_delivery ON attempts (delivery_id);
CREATE INDEX attempts_run ON attempts (run_id);

-- One row per dispatcher run.
CREATE TABLE runs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    pid         INTEGER NOT NULL,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER,
    routed      INTEGER NOT NULL DEFAULT 0,
    reclaimed   INTEGER NOT NULL DEFAULT 0,
    forked      INTEGER NOT NULL DEFAULT 0,
    delivered   INTEGER NOT NULL DEFAULT 0,
    retried     INTEGER NOT NULL DEFAULT 0,
    dead        INTEGER NOT NULL DEFAULT 0,
    failed      INTEGER NOT NULL DEFAULT 0
);
