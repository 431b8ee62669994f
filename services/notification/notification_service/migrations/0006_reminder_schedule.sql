-- The next reminder to wake up for is the first one in reminders_pending
-- that is not waiting for a retry, or the first of those that are: this
-- index finds the latter without reading every pending reminder.
CREATE INDEX reminders_retrying ON reminders (retry_at)
    WHERE retry_at IS NOT NULL AND sent_at IS NULL AND NOT cancelled;
