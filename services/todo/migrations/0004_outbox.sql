-- The transactional outbox (mesh_common.outbox.OUTBOX_DDL): events are written
-- with the change they describe, and published later by the relay.
CREATE TABLE IF NOT EXISTS outbox (
    id uuid PRIMARY KEY,
    routing_key text NOT NULL,
    payload bytea NOT NULL,
    correlation_id text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX IF NOT EXISTS outbox_unpublished ON outbox (created_at) WHERE published_at IS NULL;
