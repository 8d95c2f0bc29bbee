-- 0006: when the next delayed delivery comes due, in one seek, so a run or
-- the daemon with nothing to do now sleeps exactly until then.
CREATE INDEX deliveries_due ON deliveries (not_before) WHERE state = 'delayed';
