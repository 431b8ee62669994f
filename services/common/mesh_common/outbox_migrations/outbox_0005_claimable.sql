-- The relay's claim (mesh_common.relay.CLAIM) in the order of this index:
-- rows never held first, by age, then held rows by the end of their hold.
-- On the old index, ordered by age alone, every claim walked past all the
-- held rows, the oldest, at every commit, just when they pile up (a broker
-- without our definitions); here the scan stops at the first one still held.
CREATE INDEX IF NOT EXISTS outbox_claimable
    ON outbox (coalesce(held_until, '-infinity'::timestamptz), created_at) WHERE published_at IS NULL;
DROP INDEX IF EXISTS outbox_unpublished;
