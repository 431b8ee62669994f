-- Whether a row is kept once published (mesh_common.outbox.enqueue, keep=).
-- An event that carries a secret (a verification code) is enqueued with
-- false: the relay deletes its row where it would mark it published, so the
-- secret is not left at rest in the database, its backups and replicas.
--
-- A constant default: PostgreSQL 11+ adds the column without rewriting the table.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS keep_published boolean NOT NULL DEFAULT true;
