-- prune_families asks, for each expired token, whether anything in its
-- family is still within the retention. With only (family_id), that read
-- every token of every long-lived family, once per expired token: a batch
-- of 1,000 took 20 s on a million dead rows beside a hundred families of a
-- thousand tokens. With (family_id, expires_at) it is one index probe
-- (0.4 s for the same batch).
CREATE INDEX refresh_tokens_family_expiry ON refresh_tokens (family_id, expires_at);
