-- 0003: views for admins using the sqlite3 shell. Times are shown as UTC
-- text; ages in seconds. Try: sqlite3 -header -column cronpost.db 'SELECT * FROM queue_depth'

-- How many deliveries wait in each state, per endpoint, and the oldest one's age.
CREATE VIEW queue_depth AS
SELECT endpoint,
       state,
       count(*) AS deliveries,
       round((CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER) - min(created_at)) / 1000.0, 1) AS oldest_age_s
FROM deliveries
GROUP BY endpoint, state
ORDER BY endpoint, state;

-- Dead letters: what died, where, after how many attempts, and why.
CREATE VIEW dead_letters AS
SELECT d.id AS delivery_id,
       d.message_id,
       m.topic,
       m.account,
       d.endpoint,
       d.attempts,
       d.last_status,
       d.last_error,
       datetime(d.updated_at / 1000, 'unixepoch') AS died_at
FROM deliveries d JOIN messages m ON m.id = d.message_id
WHERE d.state = 'dead'
ORDER BY d.updated_at DESC;

-- Each endpoint: its backlog, its last hour of attempts, and its circuit breaker.
CREATE VIEW endpoint_status AS
WITH ends AS (SELECT DISTINCT endpoint FROM deliveries
              UNION SELECT endpoint FROM subscriptions
              UNION SELECT endpoint FROM endpoint_health),
     hour AS (SELECT d.endpoint,
                     sum(a.outcome IN ('delivered', 'handed_over')) AS ok,
                     sum(a.outcome NOT IN ('delivered', 'handed_over', 'in_flight')) AS failed
              FROM attempts a JOIN deliveries d ON d.id = a.delivery_id
              WHERE a.started_at > CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER) - 3600000
              GROUP BY d.endpoint)
SELECT e.endpoint,
       (SELECT count(*) FROM deliveries WHERE endpoint = e.endpoint AND state = 'ready') AS ready,
       (SELECT count(*) FROM deliveries WHERE endpoint = e.endpoint AND state = 'delayed') AS delayed,
       (SELECT count(*) FROM deliveries WHERE endpoint = e.endpoint AND state = 'leased') AS in_flight,
       coalesce(hour.ok, 0) AS ok_last_hour,
       coalesce(hour.failed, 0) AS failed_last_hour,
       CASE WHEN h.saturated_until > CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER) THEN 'saturated'
            WHEN h.failures > 0 THEN 'probing'
            ELSE 'ok' END AS health,
       datetime(h.saturated_until / 1000, 'unixepoch') AS cooldown_until,
       coalesce(h.failures, 0) AS failures_in_a_row,
       h.last_error
FROM ends e
LEFT JOIN endpoint_health h ON h.endpoint = e.endpoint
LEFT JOIN hour ON hour.endpoint = e.endpoint
ORDER BY e.endpoint;

-- Each account with work waiting: ready, delayed (by its budget or otherwise), in flight.
CREATE VIEW account_backlog AS
SELECT account,
       sum(state = 'ready') AS ready,
       sum(state = 'delayed') AS delayed,
       sum(state = 'delayed' AND reason = 'account_budget') AS held_by_budget,
       sum(state = 'leased') AS in_flight,
       datetime(max(CASE WHEN reason = 'account_budget' THEN not_before END) / 1000, 'unixepoch') AS budget_until
FROM deliveries
WHERE state IN ('ready', 'delayed', 'leased')
GROUP BY account
ORDER BY ready + delayed DESC, account;

-- The last 100 attempts, newest first.
CREATE VIEW recent_attempts AS
SELECT a.id AS attempt_id,
       datetime(a.started_at / 1000, 'unixepoch') AS started,
       a.delivery_id,
       d.endpoint,
       d.account,
       a.number,
       a.outcome,
       a.http_status,
       a.duration_ms,
       a.error
FROM attempts a JOIN deliveries d ON d.id = a.delivery_id
ORDER BY a.id DESC
LIMIT 100;

-- Purging old delivered history by time.
CREATE INDEX deliveries_delivered ON deliveries (updated_at) WHERE state = 'delivered';
