-- The sweeper's scan: open rows by when their check is due (recheck's "no check left behind").
-- Partial, so terminal rows (nearly all of a large store) cost it nothing.
CREATE INDEX messages_due ON messages (next_check_at) WHERE status IN ('pending', 'resent');
