-- The recipient cap (recipient_cap.py): at most so many emails to one
-- address in a rolling hour. recipient_key is the address as the cap counts
-- it (lower case, no "+tag"); counted_at marks a claim that counts, from
-- the moment it was counted. Both NULL on the rows from before: they never
-- count, and adding nullable columns rewrites nothing.
ALTER TABLE notifications ADD COLUMN recipient_key text, ADD COLUMN counted_at timestamptz;
-- 'capped': over the cap, not sent, and never sent: final, like 'sent', so
-- that a redelivery sends nothing either. NOT VALID, as in 0007: every row
-- meets this check, and a scan to prove it would hold the table's lock.
ALTER TABLE notifications
    DROP CONSTRAINT notifications_status_check,
    ADD CONSTRAINT notifications_status_check
        CHECK (status IN ('sending', 'sent', 'unconfirmed', 'capped')) NOT VALID;
-- Each claim counts an address's last hour: only the rows that count, and
-- those by address then time, so the count reads an hour's worth at most.
CREATE INDEX notifications_recipient_counted ON notifications (recipient_key, counted_at)
    WHERE counted_at IS NOT NULL;
