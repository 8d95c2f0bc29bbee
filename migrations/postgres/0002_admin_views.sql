-- 0002: views for admins using psql, the same names, columns and text as
-- the SQLite views (migrations/sqlite/0003, 0004). Times are shown as UTC
-- text; ages in seconds. Try: psql "$DATABASE" -c 'SELECT * FROM queue_depth'

-- A time in Unix epoch milliseconds as UTC text, as SQLite's
-- datetime(ms / 1000, 'unixepoch') writes it.
CREATE FUNCTION cronpost_utc(ms BIGINT) RETURNS TEXT
LANGUAGE sql IMMUTABLE AS $$
    SELECT to_char(to_timestamp(ms / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS')
$$;

-- How many deliveries wait in each state, per endpoint, and the oldest one's age.
CREATE VIEW queue_depth AS
SELECT endpoint,
       state,
       count(*) AS deliveries,
       round((cronpost_now_ms() - min(created_at)) / 1000.0, 1) AS oldest_age_s
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
       cronpost_utc(d.updated_at) AS died_at
FROM deliveries d JOIN messages m ON m.id = d.message_id
WHERE d.state = 'dead'
ORDER BY d.updated_at DESC;

-- Each endpoint: its backlog, its last hour of attempts, and its circuit breaker.
CREATE VIEW endpoint_status AS
WITH ends AS (SELECT endpoint FROM deliveries
              UNION SELECT endpoint FROM subscriptions
              UNION SELECT endpoint FROM endpoint_health),
     hour AS (SELECT d.endpoint,
                     count(*) FILTER (WHERE a.outcome IN ('delivered', 'handed_over')) AS ok,
                     count(*) FILTER (WHERE a.outcome NOT IN ('delivered', 'handed_over', 'in_flight')) AS failed
              FROM attempts a JOIN deliveries d ON d.id = a.delivery_id
              WHERE a.started_at > cronpost_now_ms() - 3600000
              GROUP BY d.endpoint)
SELECT e.endpoint,
       (SELECT count(*) FROM deliveries WHERE endpoint = e.endpoint AND state = 'ready') AS ready,
       (SELECT count(*) FROM deliveries WHERE endpoint = e.endpoint AND state = 'delayed') AS delayed,
       (SELECT count(*) FROM deliveries WHERE endpoint = e.endpoint AND state = 'leased') AS in_flight,
       coalesce(hour.ok, 0) AS ok_last_hour,
       coalesce(hour.failed, 0) AS failed_last_hour,
       CASE WHEN h.saturated_until > cronpost_now_ms() THEN 'saturated'
            WHEN h.failures > 0 THEN 'probing'
            ELSE 'ok' END AS health,
       cronpost_utc(h.saturated_until) AS cooldown_until,
       coalesce(h.failures, 0) AS failures_in_a_row,
       h.last_error
FROM ends e
LEFT JOIN endpoint_health h ON h.endpoint = e.endpoint
LEFT JOIN hour ON hour.endpoint = e.endpoint
ORDER BY e.endpoint;

-- Each account with work waiting: ready, delayed (by its budget or otherwise), in flight.
CREATE VIEW account_backlog AS
SELECT account,
       count(*) FILTER (WHERE state = 'ready') AS ready,
       count(*) FILTER (WHERE state = 'delayed') AS delayed,
       count(*) FILTER (WHERE state = 'delayed' AND reason = 'account_budget') AS held_by_budget,
       count(*) FILTER (WHERE state = 'leased') AS in_flight,
       cronpost_utc(max(not_before) FILTER (WHERE reason = 'account_budget')) AS budget_until
FROM deliveries
WHERE state IN ('ready', 'delayed', 'leased')
GROUP BY account
ORDER BY count(*) FILTER (WHERE state IN ('ready', 'delayed')) DESC, account;

-- The last 100 attempts, newest first.
CREATE VIEW recent_attempts AS
SELECT a.id AS attempt_id,
       cronpost_utc(a.started_at) AS started,
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

-- Messages no endpoint subscribes to (written with plain SQL).
CREATE VIEW unroutable_messages AS
SELECT id,
       uid,
       topic,
       account,
       cronpost_utc(created_at) AS created,
       route_error
FROM messages
WHERE route_error IS NOT NULL
ORDER BY id;
