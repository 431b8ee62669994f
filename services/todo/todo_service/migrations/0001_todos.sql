-- Each user's todos. Every row belongs to exactly one owner (a user id from
-- the user-service, which lives in another database: no foreign key).
CREATE TABLE todos (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    owner_id uuid NOT NULL,
    title text NOT NULL CHECK (char_length(title) BETWEEN 1 AND 200),
    description text CHECK (char_length(description) <= 2000),
    due_at timestamptz,
    priority text NOT NULL DEFAULT 'normal' CHECK (priority IN ('low', 'normal', 'high')),
    completed boolean NOT NULL DEFAULT false,
    completed_at timestamptz,
    -- Bumped by every change: the ETag, and what If-Match is checked against.
    version integer NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CHECK (completed = (completed_at IS NOT NULL))
);

-- The list is always one owner's, newest first, paged by (created_at, id).
CREATE INDEX todos_owner_created ON todos (owner_id, created_at DESC, id DESC);
-- completed=true|false keeps the same order, so the sort keys follow the filter.
CREATE INDEX todos_owner_completed ON todos (owner_id, completed, created_at DESC, id DESC);
CREATE INDEX todos_owner_due ON todos (owner_id, due_at);
