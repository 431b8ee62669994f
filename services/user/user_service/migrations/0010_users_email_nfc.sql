-- Emails in NFC, as they are stored and looked up since validation began to
-- normalize them (validation._composed). A row from before may hold its
-- address decomposed ("e" and a combining accent): the login lookup, which
-- normalizes what is typed, never finds it, and the unique index on
-- lower(email) takes the composed spelling for another address, so a second
-- account could register it.
--
-- Rows that become one address once normalized are two accounts of one
-- mailbox. Which to keep is for a person to decide: the migration stops
-- (and the service does not start) naming every such group, rather than
-- fail on the unique index without saying which rows. Grouped on what the
-- index will hold after the update, lower(normalize(email, NFC)).
--
-- Writes wait until this commits: an instance still running could otherwise
-- register or change an email between the check and the update, and fail
-- it on the unique index after all.
LOCK TABLE users IN SHARE ROW EXCLUSIVE MODE;
DO $$
DECLARE
    collisions text;
BEGIN
    SELECT string_agg(ids, '; ' ORDER BY ids) INTO collisions
    FROM (
        SELECT string_agg(id::text, ', ' ORDER BY id) AS ids
        FROM users
        GROUP BY lower(normalize(email, NFC))
        HAVING count(*) > 1
    ) AS one_address;
    IF collisions IS NOT NULL THEN
        RAISE EXCEPTION 'emails of different accounts are one address once NFC-normalized; user ids: %', collisions
            USING HINT = 'Change the email of, or delete, all but one account of each group, then start again.';
    END IF;
END
$$;
-- updated_at is left alone: the address is the one the user gave, spelled
-- as every later one is.
UPDATE users SET email = normalize(email, NFC) WHERE email IS NOT NFC NORMALIZED;
