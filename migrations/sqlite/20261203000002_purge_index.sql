-- Retention's scan: purgeable rows (terminal, or `unused`) by age, so each bounded batch of the
-- purge reads only the rows it deletes, whatever else the store holds. It replaces the index on
-- `updated_at` alone, which no query reads any more (a redrive's list reads this one), so a
-- status change still updates as many indexes as before.
CREATE INDEX messages_status_updated ON messages (status, updated_at);
DROP INDEX messages_updated;
