-- 0005: what producers write with plain SQL is checked at INSERT, so a
-- bad row fails at once with an error instead of stopping delivery later;
-- dedup keys are per account; leases carry the boot they were taken in.

-- SQLite does not type-check columns: these triggers do, for every column
-- a producer may write (after the column's affinity: '5' for priority is
-- stored as 5 and accepted, 'abc' is refused).
CREATE TRIGGER messages_text_columns BEFORE INSERT ON messages
WHEN typeof(NEW.topic) != 'text' OR typeof(NEW.account) != 'text' OR typeof(NEW.payload) != 'text'
  OR typeof(NEW.uid) != 'text' OR typeof(NEW.dedup_key) NOT IN ('text', 'null')
BEGIN
    SELECT RAISE(ABORT, 'messages: topic, account, payload, uid and dedup_key must be TEXT');
END;

CREATE TRIGGER messages_integer_columns BEFORE INSERT ON messages
WHEN typeof(NEW.priority) != 'integer' OR typeof(NEW.created_at) != 'integer'
  OR typeof(NEW.available_at) NOT IN ('integer', 'null')
BEGIN
    SELECT RAISE(ABORT, 'messages: priority, created_at and available_at must be INTEGER (times in Unix epoch milliseconds)');
END;

-- Topics and accounts go into HTTP headers and logs: printable, bounded.
CREATE TRIGGER messages_names BEFORE INSERT ON messages
WHEN NEW.topic GLOB ('*[' || char(1) || '-' || char(31) || char(127) || ']*')
  OR NEW.account GLOB ('*[' || char(1) || '-' || char(31) || char(127) || ']*')
  OR NEW.dedup_key GLOB ('*[' || char(1) || '-' || char(31) || char(127) || ']*')
  OR length(NEW.topic) > 255 OR length(NEW.account) > 255 OR length(NEW.dedup_key) > 255
BEGIN
    SELECT RAISE(ABORT, 'messages: topic, account and dedup_key must be at most 255 characters without control characters');
END;

-- The uid is the webhook-id, signed as it is sent: the Standard Webhooks
-- alphabet only, and unique. A uid written by hand outside the alphabet,
-- or twice, is given a fresh one first (the one change ever made to a
-- message: without it such a message could never be verified).
DROP TRIGGER messages_immutable;
UPDATE messages SET uid = 'msg_' || lower(hex(randomblob(12)))
WHERE typeof(uid) != 'text' OR length(uid) NOT BETWEEN 1 AND 128 OR uid GLOB '*[^A-Za-z0-9_.-]*'
   OR id NOT IN (SELECT min(id) FROM messages GROUP BY uid);
CREATE TRIGGER messages_immutable
BEFORE UPDATE OF id, uid, topic, account, payload, priority, created_at, available_at, dedup_key ON messages
BEGIN
    SELECT RAISE(ABORT, 'messages are immutable');
END;
CREATE TRIGGER messages_uid BEFORE INSERT ON messages
WHEN length(NEW.uid) NOT BETWEEN 1 AND 128 OR NEW.uid GLOB '*[^A-Za-z0-9_.-]*'
BEGIN
    SELECT RAISE(ABORT, 'messages: uid must be 1 to 128 of A-Z a-z 0-9 _ . -');
END;
CREATE UNIQUE INDEX messages_uid ON messages (uid);

-- A dedup key is unique per account, not across accounts.
DROP INDEX messages_dedup;
CREATE UNIQUE INDEX messages_dedup ON messages (account, dedup_key) WHERE dedup_key IS NOT NULL;

-- Rows written before these checks: a message that cannot be delivered as
-- written is dead-lettered (routed) or marked unroutable (not yet routed).
UPDATE deliveries
SET state = 'dead', reason = NULL, lease_owner = NULL, lease_expires_at = NULL,
    last_error = 'the message cannot be decoded: a column holds the wrong type (written with plain SQL before migration 5)',
    updated_at = CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)
WHERE state IN ('ready', 'delayed') AND (
    typeof(account) != 'text' OR typeof(priority) != 'integer' OR typeof(not_before) != 'integer'
    OR message_id IN (SELECT id FROM messages WHERE typeof(topic) != 'text' OR typeof(account) != 'text'
                      OR typeof(payload) != 'text' OR typeof(uid) != 'text'));
UPDATE messages
SET routed_at = CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER),
    route_error = 'a column holds the wrong type (written with plain SQL before migration 5)'
WHERE routed_at IS NULL AND (
    typeof(topic) != 'text' OR typeof(account) != 'text' OR typeof(payload) != 'text' OR typeof(uid) != 'text'
    OR typeof(priority) != 'integer' OR typeof(available_at) NOT IN ('integer', 'null'));

-- A lease's expiry on the boot-time clock of the boot that took it: on the
-- same boot, a lease is reclaimed only when that clock says it expired, so
-- a wall-clock jump cannot hand a live child's delivery to another child;
-- a lease from another boot expires by the wall clock.
ALTER TABLE deliveries ADD COLUMN lease_boot_id TEXT;
ALTER TABLE deliveries ADD COLUMN lease_boot_expires_at INTEGER;

-- Deliveries parked because their endpoint left the config (reason
-- endpoint_removed): found again when it returns, and for `stats`.
CREATE INDEX deliveries_parked ON deliveries (endpoint) WHERE reason = 'endpoint_removed';

-- Children of a run that found nothing they could lease, so a run's
-- summary accounts for every child.
ALTER TABLE runs ADD COLUMN found_nothing INTEGER NOT NULL DEFAULT 0;
