-- 0002: saturation. Per-account and per-endpoint rates (GCRA), endpoint
-- health (a circuit breaker), and a delayed queue that children lease from
-- directly once a delivery's time has come.

-- Delayed deliveries in priority order, then by when they become eligible.
DROP INDEX deliveries_due;
CREATE INDEX deliveries_delayed ON deliveries (priority DESC, not_before) WHERE state = 'delayed';
-- Rerouting every ready delivery of one account or endpoint at once.
CREATE INDEX deliveries_ready_account ON deliveries (account) WHERE state = 'ready';
CREATE INDEX deliveries_ready_endpoint ON deliveries (endpoint) WHERE state = 'ready';

-- One GCRA "theoretical arrival time" (ms, fractional) per limited key: the
-- key may send now if tat <= now + burst tolerance.
CREATE TABLE rate_limits (
    kind TEXT NOT NULL CHECK (kind IN ('account', 'endpoint')),
    key  TEXT NOT NULL,
    tat  REAL NOT NULL,
    PRIMARY KEY (kind, key)
) WITHOUT ROWID;

-- Each endpoint's circuit breaker. Open while saturated_until is in the
-- future; then one probe (probe_owner, until probe_expires_at) may go;
-- an unsaturated answer closes it (failures = 0).
CREATE TABLE endpoint_health (
    endpoint         TEXT PRIMARY KEY,
    saturated_until  INTEGER,
    failures         INTEGER NOT NULL DEFAULT 0,
    probe_owner      TEXT,
    probe_expires_at INTEGER,
    last_error       TEXT,
    updated_at       INTEGER NOT NULL
) WITHOUT ROWID;
