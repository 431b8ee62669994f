-- Every email this service sends, claimed before the SMTP transaction and
-- marked sent after it. The unique (event_id, kind) is what makes delivery
-- idempotent: a redelivered event finds its row and sends nothing.
CREATE TABLE notifications (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- The event that caused the email; for a reminder, the event that
    -- scheduled it (see reminders.event_id).
    event_id uuid NOT NULL,
    kind text NOT NULL,
    user_id text NOT NULL,
    recipient text NOT NULL,
    subject text NOT NULL,
    -- Derived from (event_id, kind), so a resend after a crash carries the
    -- same Message-ID as the first attempt.
    message_id text NOT NULL,
    status text NOT NULL CHECK (status IN ('sending', 'sent')),
    claimed_at timestamptz NOT NULL DEFAULT now(),
    sent_at timestamptz,
    UNIQUE (event_id, kind)
);

-- GET /notifications: a user's sent notifications, newest first.
CREATE INDEX notifications_history ON notifications (user_id, sent_at DESC, id DESC) WHERE status = 'sent';

-- One reminder per todo, kept up to date from todo events alone: the
-- service never reads the todo-service's database.
CREATE TABLE reminders (
    todo_id text PRIMARY KEY,
    user_id text NOT NULL,
    title text NOT NULL,
    due_at timestamptz,
    remind_at timestamptz,
    -- The event that set the current due date: the reminder's idempotency
    -- key, so that a new due date gets a new reminder and a redelivered
    -- event does not.
    event_id uuid NOT NULL,
    -- When that last applied event happened: an older event arriving late
    -- (a retry, a replay) must not undo a newer one.
    event_at timestamptz NOT NULL,
    sent_at timestamptz,
    -- Completed, deleted or without a due date: nothing to remind of.
    cancelled boolean NOT NULL DEFAULT false
);

CREATE INDEX reminders_pending ON reminders (remind_at) WHERE sent_at IS NULL AND NOT cancelled;
