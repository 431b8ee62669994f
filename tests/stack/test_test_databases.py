"""A test database whose applied migration was edited since is made again, not failed on at every test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiopg
import pytest

from devstack.config import StackConfig
from mesh_common.testing.database import migrate_test_database


@pytest.fixture
def admin_url(infra: StackConfig) -> str:
    return f"postgresql://postgres@127.0.0.1:{infra.ports.postgres}/postgres"


@pytest.fixture
async def scratch_url(infra: StackConfig, admin_url: str) -> AsyncIterator[str]:
    """A database of this test's own on the test stack's server: the suites' own are in use."""
    name = f"scratch_{uuid.uuid4().hex[:12]}"
    async with aiopg.connect(admin_url) as admin, admin.cursor() as cur:
        await cur.execute(f"CREATE DATABASE {name} OWNER todos")
        try:
            yield f"postgresql://todos:todos@127.0.0.1:{infra.ports.postgres}/{name}"
        finally:
            await cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def rows(url: str, query: str) -> list[tuple[object, ...]]:
    async with aiopg.connect(url) as conn, conn.cursor() as cur:
        await cur.execute(query)
        return list(await cur.fetchall())


async def test_a_migration_edited_after_it_was_applied_makes_the_test_database_again(
    scratch_url: str, admin_url: str, tmp_path: Path
) -> None:
    # After an edit or a branch switch, every test failed on "migration X was
    # changed after it was applied" until someone deleted run/test by hand.
    migration = tmp_path / "0001_notes.sql"
    migration.write_text("CREATE TABLE notes (body text);")
    assert await migrate_test_database(scratch_url, [tmp_path], admin_url=admin_url) is None
    async with aiopg.connect(scratch_url) as conn, conn.cursor() as cur:
        await cur.execute("INSERT INTO notes VALUES ('from before the edit')")

    migration.write_text("CREATE TABLE notes (body text NOT NULL);")
    said = await migrate_test_database(scratch_url, [tmp_path], admin_url=admin_url)

    name = scratch_url.rsplit("/", 1)[1]
    assert said == (
        f"the test database {name} was dropped and made again: migration 0001_notes was changed after it was applied"
    )
    assert await rows(scratch_url, "SELECT * FROM notes") == []
    assert await rows(
        scratch_url, "SELECT attnotnull FROM pg_attribute WHERE attrelid = 'notes'::regclass AND attname = 'body'"
    ) == [(True,)]
    owner = "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
    assert await rows(scratch_url, owner) == [("todos",)]
    # And from then on it is migrated as ever.
    assert await migrate_test_database(scratch_url, [tmp_path], admin_url=admin_url) is None


async def test_other_migration_failures_are_raised_and_leave_the_database_alone(
    scratch_url: str, admin_url: str, tmp_path: Path
) -> None:
    (tmp_path / "0001_notes.sql").write_text("CREATE TABLE notes (body text);")
    assert await migrate_test_database(scratch_url, [tmp_path], admin_url=admin_url) is None
    with pytest.raises(RuntimeError, match="migration folders not found"):
        await migrate_test_database(scratch_url, [tmp_path / "missing"], admin_url=admin_url)
    assert await rows(scratch_url, "SELECT version FROM schema_migrations") == [("0001_notes",)]
