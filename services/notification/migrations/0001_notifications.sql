CREATE TABLE notifications (
    id uuid PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now()
);
