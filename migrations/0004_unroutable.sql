-- 0004: a message whose topic no endpoint subscribes to (possible with plain
-- SQL inserts) is marked once with the reason, instead of being looked at
-- and warned about by every run. It is kept for `retention`, like delivered
-- history, and `cronpost requeue --unroutable` routes it again.
ALTER TABLE messages ADD COLUMN route_error TEXT;

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
