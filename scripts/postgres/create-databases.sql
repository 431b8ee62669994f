-- One database and one role per service: a service can reach only its own data.
-- Runs as the superuser, at every start: from the native stack, and from
-- compose's postgres-init. Dev-only passwords: each equals the role name.
-- Idempotent (psql's \gexec), for that.
SELECT 'CREATE ROLE ' || r || ' LOGIN PASSWORD ' || quote_literal(r)
FROM unnest(ARRAY['users', 'todos', 'notifications']) AS r
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r)
\gexec

SELECT 'CREATE DATABASE ' || d || ' OWNER ' || d
FROM unnest(ARRAY['users', 'todos', 'notifications']) AS d
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = d)
\gexec

-- The text of a statement that fails is not logged for the user-service's
-- role, only its error: psycopg2 sends parameters inside the text, and one
-- may be a verification code (an outbox INSERT cut by statement_timeout)
-- or a password's hash, which would then outlive them in the server's log.
ALTER ROLE users SET log_min_error_statement = 'panic';
