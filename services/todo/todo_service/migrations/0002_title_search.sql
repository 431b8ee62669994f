-- q=<text> is a substring search on titles (ILIKE '%text%'), which a B-tree
-- cannot serve; a trigram index can. pg_trgm is a trusted extension, so the
-- database owner may create it.
CREATE EXTENSION IF NOT EXISTS pg_trgm;
CREATE INDEX todos_title_trgm ON todos USING gin (title gin_trgm_ops);
