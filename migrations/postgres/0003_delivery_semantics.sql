-- 0003: delivery semantics.
-- slow_after: fire-and-forget answers that did not come within the window,
-- in a row, per endpoint; at the endpoint's slow_after-th its breaker opens.
ALTER TABLE endpoint_health ADD COLUMN silent BIGINT NOT NULL DEFAULT 0;

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
       cronpost_utc(d.updated_at) AS died_at
FROM deliveries d JOIN messages m ON m.id = d.message_id
WHERE d.state = 'dead'
ORDER BY d.updated_at DESC;

-- Expiry: a message may carry expires_at (Unix ms; NULL: its topic's
-- max_age, if any, from created_at). Routing gives each delivery its
-- expiry; an expired delivery is never leased, and runs make it dead
-- (reason expired) or remove it (the topic's discard_expired).
ALTER TABLE messages ADD COLUMN expires_at BIGINT;
ALTER TABLE deliveries ADD COLUMN expires_at BIGINT;
ALTER TABLE subscriptions ADD COLUMN max_age_ms BIGINT;
ALTER TABLE subscriptions ADD COLUMN discard_expired BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE runs ADD COLUMN expired BIGINT NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN discarded BIGINT NOT NULL DEFAULT 0;
CREATE INDEX deliveries_expiring ON deliveries (expires_at)
WHERE expires_at IS NOT NULL AND state IN ('ready', 'delayed');

-- Ordering keys: for one endpoint, the deliveries of messages with one
-- ordering_key go one at a time, in publication order. Only one per key
-- and endpoint is in progress (ready, leased, or delayed for a retry, a
-- budget, a cool-down); the later ones wait in the delayed queue with
-- reason 'ordering' (parked: not_before year 9999) until the finish of the
-- one in progress (or a run) moves the earliest to the ready queue, not
-- before its release_at (a requeue's slot) if it has one. A dead one
-- releases its key, unless its endpoint says on_dead = "block"
-- (subscriptions.ordering_on_dead).
ALTER TABLE messages ADD COLUMN ordering_key TEXT COLLATE "C"
    CHECK (length(ordering_key) BETWEEN 1 AND 255 AND ordering_key !~ '[\x01-\x1f\x7f]');
ALTER TABLE deliveries ADD COLUMN ordering_key TEXT COLLATE "C";
ALTER TABLE subscriptions ADD COLUMN ordering_on_dead TEXT NOT NULL DEFAULT 'release'
    CHECK (ordering_on_dead IN ('release', 'block'));
ALTER TABLE deliveries ADD COLUMN release_at BIGINT;
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

CREATE OR REPLACE FUNCTION messages_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.id, NEW.uid, NEW.topic, NEW.account, NEW.payload, NEW.priority, NEW.created_at,
        NEW.available_at, NEW.dedup_key, NEW.expires_at, NEW.ordering_key)
       IS DISTINCT FROM
       (OLD.id, OLD.uid, OLD.topic, OLD.account, OLD.payload, OLD.priority, OLD.created_at,
        OLD.available_at, OLD.dedup_key, OLD.expires_at, OLD.ordering_key) THEN
        RAISE EXCEPTION 'messages are immutable';
    END IF;
    RETURN NEW;
END $$;
