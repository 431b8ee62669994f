-- When a key stopped signing: retiring it must wait until every token it
-- signed has expired, and that is counted from here. NULL for keys that were
-- retiring before this column existed (long enough ago, by now).
ALTER TABLE signing_keys ADD COLUMN retiring_at timestamptz;
