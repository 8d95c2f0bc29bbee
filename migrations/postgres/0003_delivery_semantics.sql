-- 0003: delivery semantics.
-- slow_after: fire-and-forget answers that did not come within the window,
-- in a row, per endpoint; at the endpoint's slow_after-th its breaker opens.
ALTER TABLE endpoint_health ADD COLUMN silent BIGINT NOT NULL DEFAULT 0;
