-- Who holds a 'sending' claim: a new token at every claim and takeover, so
-- that a delivery whose claim was taken over after its lease cannot release
-- (delete) the claim of the delivery that took it over. Nullable and without
-- a default, so adding it rewrites nothing; rows claimed before it have none.
ALTER TABLE notifications ADD COLUMN claim_token uuid;
