-- A reminder whose delivery failed for a reason of its own (its recipient's
-- mailbox is full, the user-service cannot say where to send it) waits until
-- then, so that the reminders due after it are not held up behind it.
ALTER TABLE reminders ADD COLUMN retry_at timestamptz;
