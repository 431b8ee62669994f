-- Published rows are deleted once past their retention (outbox.prune_published),
-- a batch at a time: the index finds each batch without reading the table.
CREATE INDEX outbox_published ON outbox (published_at) WHERE published_at IS NOT NULL;
