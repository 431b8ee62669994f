-- The transactional outbox (mesh_common.outbox): events are written with the
-- change they describe, and published later by the relay.
--
-- IF NOT EXISTS because databases migrated before this set existed already
-- have the table, from their own 0004_outbox: there this file does nothing.
CREATE TABLE IF NOT EXISTS outbox (
    id uuid PRIMARY KEY,
    routing_key text NOT NULL,
    payload bytea NOT NULL,
    correlation_id text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX IF NOT EXISTS outbox_unpublished ON outbox (created_at) WHERE published_at IS NULL;
