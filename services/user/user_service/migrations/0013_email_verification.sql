-- Email verification. An address gets nothing but a confirmation until its
-- owner proves they read it: a code mailed to it comes back. Accounts from
-- before stay unverified (their addresses were never proven) until they ask
-- for a code.
ALTER TABLE users ADD COLUMN email_verified_at timestamptz;
-- The codes: only their SHA-256, so a copy of this table verifies nothing.
-- `email` is the address a code proves: once the account's address changes,
-- the code proves nothing. At most one per user (issuing one deletes the
-- user's others), so the table stays as small as the user count without
-- pruning.
CREATE TABLE email_verifications (
    token_hash bytea PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    email text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX email_verifications_user ON email_verifications (user_id);
