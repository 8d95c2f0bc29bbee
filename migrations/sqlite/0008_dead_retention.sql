-- 0008: dead letters are kept for `dead_retention` (default 30 days), then
-- purged by runs like delivered history: by age, oldest first.
CREATE INDEX deliveries_dead ON deliveries (updated_at) WHERE state = 'dead';
