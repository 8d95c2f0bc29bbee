-- 0009: delivery semantics.
-- slow_after: fire-and-forget answers that did not come within the window,
-- in a row, per endpoint; at the endpoint's slow_after-th its breaker opens.
ALTER TABLE endpoint_health ADD COLUMN silent INTEGER NOT NULL DEFAULT 0;

-- A dead letter keeps why it died in `reason` (rejected, attempts_exhausted,
-- undecodable, expired), so `requeue --reason` can pick them; the ones that
-- died before are told apart by their last error.
UPDATE deliveries
SET reason = CASE WHEN last_error LIKE '%permanent failure%' THEN 'rejected'
                  WHEN last_error LIKE '%cannot be decoded%' THEN 'undecodable'
                  ELSE 'attempts_exhausted' END
WHERE state = 'dead' AND reason IS NULL;
DROP VIEW dead_letters;
CREATE VIEW dead_letters AS
SELECT d.id AS delivery_id,
       d.message_id,
       m.topic,
       m.account,
       d.endpoint,
       d.reason,
       d.attempts,
       d.last_status,
       d.last_error,
       datetime(d.updated_at / 1000, 'unixepoch') AS died_at
FROM deliveries d JOIN messages m ON m.id = d.message_id
WHERE d.state = 'dead'
ORDER BY d.updated_at DESC;

-- Expiry: a message may carry expires_at (Unix ms; NULL: its topic's
-- max_age, if any, from created_at). Routing gives each delivery its
-- expiry; an expired delivery is never leased, and runs make it dead
-- (reason expired) or remove it (the topic's discard_expired).
ALTER TABLE messages ADD COLUMN expires_at INTEGER;
ALTER TABLE deliveries ADD COLUMN expires_at INTEGER;
ALTER TABLE subscriptions ADD COLUMN max_age_ms INTEGER;
ALTER TABLE subscriptions ADD COLUMN discard_expired INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN expired INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN discarded INTEGER NOT NULL DEFAULT 0;
CREATE INDEX deliveries_expiring ON deliveries (expires_at)
WHERE expires_at IS NOT NULL AND state IN ('ready', 'delayed');

CREATE TRIGGER messages_expiry_column BEFORE INSERT ON messages
WHEN typeof(NEW.expires_at) NOT IN ('integer', 'null')
BEGIN
    SELECT RAISE(ABORT, 'messages: expires_at must be INTEGER (Unix epoch milliseconds) or NULL');
END;

-- Ordering keys: for one endpoint, the deliveries of messages with one
-- ordering_key go one at a time, in publication order. Only one per key
-- and endpoint is in progress (ready, leased, or delayed for a retry, a
-- budget, a cool-down); the later ones wait in the delayed queue with
-- reason 'ordering' (parked: not_before year 9999) until the finish of the
-- one in progress (or a run) moves the earliest to the ready queue, not
-- before its release_at (a requeue's slot) if it has one. A dead one
-- releases its key, unless its endpoint says on_dead = "block"
-- (subscriptions.ordering_on_dead).
ALTER TABLE messages ADD COLUMN ordering_key TEXT;
ALTER TABLE deliveries ADD COLUMN ordering_key TEXT;
ALTER TABLE subscriptions ADD COLUMN ordering_on_dead TEXT NOT NULL DEFAULT 'release'
    CHECK (ordering_on_dead IN ('release', 'block'));
ALTER TABLE deliveries ADD COLUMN release_at INTEGER;
-- Whether a key is in progress (or blocked by a dead one): its deliveries
-- that do not wait, by state. Delivered history is never scanned: the
-- lookups name their states.
CREATE INDEX deliveries_keys ON deliveries (endpoint, ordering_key, state)
WHERE ordering_key IS NOT NULL AND coalesce(reason, '') <> 'ordering';
-- A key's waiting deliveries, in publication order.
CREATE INDEX deliveries_waiting ON deliveries (endpoint, ordering_key, message_id)
WHERE state = 'delayed' AND reason = 'ordering';
-- Earlier messages of a key in the batch being routed.
CREATE INDEX messages_unrouted_keys ON messages (ordering_key, id)
WHERE routed_at IS NULL AND ordering_key IS NOT NULL;

CREATE TRIGGER messages_ordering_key BEFORE INSERT ON messages
WHEN typeof(NEW.ordering_key) NOT IN ('text', 'null')
  OR NEW.ordering_key GLOB ('*[' || char(1) || '-' || char(31) || char(127) || ']*')
  OR length(NEW.ordering_key) NOT BETWEEN 1 AND 255
BEGIN
    SELECT RAISE(ABORT, 'messages: ordering_key must be TEXT of 1 to 255 characters without control characters, or NULL');
END;

DROP TRIGGER messages_immutable;
CREATE TRIGGER messages_immutable
BEFORE UPDATE OF id, uid, topic, account, payload, priority, created_at, available_at, dedup_key,
                 expires_at, ordering_key ON messages
BEGIN
    SELECT RAISE(ABORT, 'messages are immutable');
END;
