-- The key the login throttle hashes login names with (HMAC-SHA256) before
-- they name a Redis key. A plain SHA-256 of a password typed into the
-- username box could be found again by anyone who reads Redis (SCAN,
-- MONITOR, a replica), hashing common passwords until one matches. Kept
-- here, away from Redis, and shared by every instance so that a name counts
-- once on all of them. One row, made by the first instance to start
-- (throttle.load_throttle_key).
CREATE TABLE login_throttle_key (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    secret bytea NOT NULL CHECK (octet_length(secret) >= 32),
    created_at timestamptz NOT NULL DEFAULT now()
);
