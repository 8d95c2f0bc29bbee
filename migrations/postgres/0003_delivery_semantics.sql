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
