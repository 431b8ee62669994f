-- Which change of its todo a reminder reflects. A todo's data.version grows
-- with every change (the todo-service changes a todo under a row lock), so
-- it orders a todo's events exactly, where occurred_at comes from the clock
-- of whichever instance made the change. A delete carries the version of
-- the todo as it was, so it ranks after a change with the same version.
-- Rows written before this column have none and are ordered by event_at.
ALTER TABLE reminders ADD COLUMN todo_version bigint;
ALTER TABLE reminders ADD COLUMN todo_deleted boolean NOT NULL DEFAULT false;
