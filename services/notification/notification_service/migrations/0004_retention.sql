-- What the pruner (retention.py) deletes by: how old a claim or a
-- reminder's last change is. Without them each round would scan the table.
CREATE INDEX notifications_claimed_at ON notifications (claimed_at);
CREATE INDEX reminders_event_at ON reminders (event_at);
