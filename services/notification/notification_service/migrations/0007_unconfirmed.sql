-- Sends of this email whose outcome was unknown: DATA went out and no answer
-- came back, so the server may have the message. After the first, the email
-- is sent once more when the claim's lease has run out; after the second it
-- is not sent again. A constant default: adding the column rewrites nothing.
ALTER TABLE notifications ADD COLUMN unknown_sends integer NOT NULL DEFAULT 0;
-- 'unconfirmed': sent twice and confirmed neither time. Final, like 'sent',
-- but not listed as sent (GET /notifications lists 'sent' only): we do not
-- know that it arrived. NOT VALID: every row meets the stricter check this
-- one replaces, and a scan to prove it would hold the table's lock for nothing.
ALTER TABLE notifications
    DROP CONSTRAINT notifications_status_check,
    ADD CONSTRAINT notifications_status_check CHECK (status IN ('sending', 'sent', 'unconfirmed')) NOT VALID;
