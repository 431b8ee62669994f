-- Ending every session of an account at once: a password change, or
-- DELETE /users/me/sessions ("sign out everywhere"). The account's epoch
-- moves on, and a refresh token whose family started under an earlier one
-- is refused. Not by revoking the account's tokens row by row: a refresh in
-- flight inserts its child after such an UPDATE took its snapshot, and a
-- login whose password was checked before the change inserts its family
-- after it; both would survive. A family takes the epoch read with the
-- password it was started by, and the refresh reads the account's at every
-- use, so neither can.
--
-- A column with a constant default changes only the catalog (PostgreSQL
-- 11 and later): every row from before is epoch 0, as its account is.
ALTER TABLE users ADD COLUMN session_epoch integer NOT NULL DEFAULT 0;
ALTER TABLE refresh_tokens ADD COLUMN session_epoch integer NOT NULL DEFAULT 0;
