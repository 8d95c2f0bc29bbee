-- 0007: the host a run ran on (`host_name`, by default the machine's
-- name), as PostgreSQL records it for the several hosts of one queue.
ALTER TABLE runs ADD COLUMN host TEXT;
