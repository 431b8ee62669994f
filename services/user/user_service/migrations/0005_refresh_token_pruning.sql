-- Families whose last token expired are deleted a batch at a time
-- (refresh_tokens.prune_families). expires_at finds each batch without
-- reading the table. parent_id is what the ON DELETE CASCADE of every
-- deleted token looks its children up by: without it, each deleted row
-- costs a scan of the whole table.
CREATE INDEX refresh_tokens_expiry ON refresh_tokens (expires_at);
CREATE INDEX refresh_tokens_parent ON refresh_tokens (parent_id);
