-- Keys are deleted once past IDEMPOTENCY_KEY_TTL (idempotency.prune_expired),
-- a batch at a time: the index finds each batch without reading the table.
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
