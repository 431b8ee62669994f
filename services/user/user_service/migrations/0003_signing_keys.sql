-- The Ed25519 keys access tokens are signed with, shared by every instance.
-- active: signs new tokens (exactly one, enforced by the partial unique
-- index, which also lets instances starting together agree through
-- INSERT ... ON CONFLICT). retiring: signs nothing, still published in the
-- JWKS so that the tokens it signed verify until they expire. retired: out of
-- the JWKS, and the tokens it signed are refused.
--
-- The private keys are stored as plain PEM: whoever can read this table can
-- mint tokens, so the database's access control is what protects them.
CREATE TABLE signing_keys (
    kid text PRIMARY KEY,
    private_key_pem text NOT NULL,
    state text NOT NULL CHECK (state IN ('active', 'retiring', 'retired')),
    created_at timestamptz NOT NULL DEFAULT now(),
    retired_at timestamptz
);
CREATE UNIQUE INDEX signing_keys_one_active ON signing_keys (state) WHERE state = 'active';
