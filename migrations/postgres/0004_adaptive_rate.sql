-- 0004: adaptive endpoint rates. What each endpoint has learned of its
-- rate limit (deliveries a second): lowered on an overload signal (429,
-- 503, a confirm-mode timeout, slow_after silences, slowing answers) to 95%
-- of what it took in the second before, raised step by step while
-- deliveries go without one, never above the endpoint's configured rate.
-- Only while the endpoint has deliveries waiting (what it took then is
-- what it can take). NULL: nothing learned. The held-back deliveries of an
-- endpoint keep reserved slots at this rate (reason endpoint_rate).
ALTER TABLE endpoint_health ADD COLUMN learned_rate DOUBLE PRECISION;
-- What the endpoint took (a second) when it last pushed back.
ALTER TABLE endpoint_health ADD COLUMN rate_ceiling DOUBLE PRECISION;
-- When and why learned_rate last changed: increase, http_429, http_503,
-- timeout, silent, slow_answers.
ALTER TABLE endpoint_health ADD COLUMN rate_changed_at BIGINT;
ALTER TABLE endpoint_health ADD COLUMN rate_reason TEXT;
-- When it was last lowered: signals from attempts started before then are
-- already counted.
ALTER TABLE endpoint_health ADD COLUMN rate_decreased_at BIGINT;
-- Confirm mode: its answer times (ms), recent (smoothed) and the baseline.
ALTER TABLE endpoint_health ADD COLUMN latency_ms DOUBLE PRECISION;
ALTER TABLE endpoint_health ADD COLUMN latency_base_ms DOUBLE PRECISION;
-- An endpoint's delayed deliveries by when they are due: its reserved
-- slots, spaced again when its rate changes, and those that came due
-- together, given slots in one statement.
CREATE INDEX deliveries_held_endpoint ON deliveries (endpoint, not_before) WHERE state = 'delayed';

DROP VIEW endpoint_status;
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
       h.last_error,
       round(h.learned_rate::numeric, 2) AS learned_rate,
       h.rate_reason,
       cronpost_utc(h.rate_changed_at) AS rate_changed_at
FROM ends e
LEFT JOIN endpoint_health h ON h.endpoint = e.endpoint
LEFT JOIN hour ON hour.endpoint = e.endpoint
ORDER BY e.endpoint;
