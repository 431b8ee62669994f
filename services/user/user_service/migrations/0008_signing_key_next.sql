-- A key is published before it signs: the 'next' key is in the JWKS from
-- the moment it is made, and rotation makes it the active one. A verifier
-- that fetched the key set in the last few seconds (and so will not fetch
-- again for an unknown kid, by its cool-down) already knows the new key.
ALTER TABLE signing_keys DROP CONSTRAINT signing_keys_state_check;
ALTER TABLE signing_keys ADD CONSTRAINT signing_keys_state_check
    CHECK (state IN ('next', 'active', 'retiring', 'retired'));
CREATE UNIQUE INDEX signing_keys_one_next ON signing_keys (state) WHERE state = 'next';
