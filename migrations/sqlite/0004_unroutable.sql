-- 0004: a message whose topic no endpoint subscribes to (possible with plain
-- SQL inserts) is marked once with the reason, instead of being looked at
-- and warned about by every run. It is routed again when a subscriber for
-- its topic appears in the config (or by `cronpost requeue --unroutable`),
-- and kept for `retention` otherwise, like delivered history.
ALTER TABLE messages ADD COLUMN route_error TEXT;
CREATE INDEX messages_unroutable ON messages (topic) WHERE route_error IS NOT NULL;

CREATE VIEW unroutable_messages AS
SELECT id,
       uid,
       topic,
       account,
       datetime(created_at / 1000, 'unixepoch') AS created,
       route_error
FROM messages
WHERE route_error IS NOT NULL
ORDER BY id;
