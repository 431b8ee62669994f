-- POST /todos with an Idempotency-Key: the first request claims the key with
-- INSERT ... ON CONFLICT in its own transaction; concurrent requests with the
-- same key wait on the primary key, then read the stored response.
CREATE TABLE idempotency_keys (
    owner_id uuid NOT NULL,
    key text NOT NULL,
    request_hash text NOT NULL,
    -- Filled in by the transaction that claimed the key, before it commits,
    -- so a committed key always has its response.
    response_status integer,
    response_body jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner_id, key)
);
