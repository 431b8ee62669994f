"""Migrations: the outbox, once the user-service's own 0004_outbox, now mesh_common's shared set;
missing folders; emails stored before they were normalized to NFC."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import aiopg
import psycopg2
import pytest

from mesh_common.db import _LOCK_ID, _migrations, migrate
from mesh_common.outbox import OUTBOX_MIGRATIONS
from user_service.app import MIGRATIONS
from user_service.settings import Settings

from .conftest import Client, Login, Register, run_again, store_email, stored_email

PASSWORD = "a long and unusual passphrase"
EMAILS_IN_NFC = MIGRATIONS[0] / "0010_users_email_nfc.sql"


# The outbox's migrations (mesh_common.outbox), applied after the service's own.
SHARED_SET = [
    "outbox_0001_table",
    "outbox_0002_published",
    "outbox_0003_keep_published",
    "outbox_0004_held_until",
    "outbox_0005_claimable",
]


async def tables(pool: aiopg.Pool) -> list[str]:
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1")
        return [row[0] for row in await cur.fetchall()]


async def test_a_database_migrated_before_the_outbox_moved_keeps_its_outbox(
    scratch: aiopg.Pool, tmp_path: Path
) -> None:
    # The state left by the service's former migrations/0004_outbox.sql: the
    # same statements, recorded under that version, and an event not yet sent.
    (tmp_path / "0004_outbox.sql").write_text((OUTBOX_MIGRATIONS / "outbox_0001_table.sql").read_text())
    assert await migrate(scratch, [tmp_path]) == ["0004_outbox"]
    async with scratch.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "INSERT INTO outbox (id, routing_key, payload, correlation_id) VALUES (gen_random_uuid(), 'x', '{}', 'x')"
        )

    applied = await migrate(scratch, MIGRATIONS)

    assert "0004_outbox" not in applied
    assert applied[-len(SHARED_SET) :] == SHARED_SET
    assert await migrate(scratch, MIGRATIONS) == []
    async with scratch.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        assert await cur.fetchone() == (1,)


async def test_a_new_database_gets_the_outbox_from_the_shared_set(scratch: aiopg.Pool) -> None:
    applied = await migrate(scratch, MIGRATIONS)

    assert applied[-len(SHARED_SET) :] == SHARED_SET
    async with scratch.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() AND tablename = 'outbox' ORDER BY 1"
        )
        assert [row[0] for row in await cur.fetchall()] == ["outbox_claimable", "outbox_pkey", "outbox_published"]


async def test_a_version_in_two_directories_is_refused(scratch: aiopg.Pool, tmp_path: Path) -> None:
    (tmp_path / "outbox_0001_table.sql").write_text("SELECT 1")

    with pytest.raises(RuntimeError, match="outbox_0001_table"):
        await migrate(scratch, [tmp_path, OUTBOX_MIGRATIONS])
    assert await tables(scratch) == []


async def test_a_missing_migration_folder_is_refused_before_anything_runs(scratch: aiopg.Pool, tmp_path: Path) -> None:
    # Listed last: a check made only when the runner reaches the folder would
    # have applied the shared set first.
    with pytest.raises(RuntimeError, match="not found"):
        await migrate(scratch, [OUTBOX_MIGRATIONS, tmp_path / "migrations"])
    assert await tables(scratch) == []


async def test_a_migration_may_outlast_the_pools_statement_timeout(settings: Settings, tmp_path: Path) -> None:
    # A pool whose statements time out after 1 s, as requests' do after 10:
    # waiting 1.5 s for another instance's lock, then a 1.5 s migration. Not
    # shorter: the same timeout bounds the pool's first connect.
    (tmp_path / "0001_slow.sql").write_text("SELECT pg_sleep(1.5); CREATE TABLE slow (id int);")
    schema = f"test_migrations_{uuid.uuid4().hex[:8]}"
    options = f"-c search_path={schema}"
    async with (
        aiopg.create_pool(settings.database_url, maxsize=1, timeout=1.0, options=options) as pool,
        aiopg.connect(settings.database_url, options=options) as other,
        other.cursor() as cur,
    ):
        await cur.execute(f"CREATE SCHEMA {schema}")
        try:
            await cur.execute("SELECT pg_advisory_lock(%s)", (_LOCK_ID,))
            migrating = asyncio.create_task(migrate(pool, [tmp_path]))
            try:
                # Released only once the migrator has waited for it past its pool's timeout.
                async with asyncio.timeout(10):  # bounded: polled every 50 ms
                    while not await waits_for_advisory_lock(cur):
                        await asyncio.sleep(0.05)
                await asyncio.sleep(1.5)  # the other instance's migration, holding the lock
                await cur.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_ID,))
                assert await asyncio.wait_for(migrating, timeout=30) == ["0001_slow"]
                assert await tables(pool) == ["schema_migrations", "slow"]
            finally:
                migrating.cancel()
                await asyncio.gather(migrating, return_exceptions=True)
        finally:
            await cur.execute(f"DROP SCHEMA {schema} CASCADE")


async def waits_for_advisory_lock(cur: aiopg.Cursor) -> bool:
    await cur.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
    row = await cur.fetchone()
    return bool(row and row[0])


async def test_a_migration_that_times_out_reports_the_timeout(
    scratch: aiopg.Pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # aiopg closes the connection of a statement past its timeout; the
    # ROLLBACK that follows fails on it, and must not replace the timeout.
    monkeypatch.setattr("mesh_common.db.MIGRATION_TIMEOUT", 0.3)
    (tmp_path / "0001_slow.sql").write_text("SELECT pg_sleep(2)")
    with pytest.raises(TimeoutError):
        await migrate(scratch, [tmp_path])


async def test_an_email_stored_decomposed_is_composed_so_it_logs_in_and_stays_taken(
    client: Client, register: Register, login: Login, db: aiopg.Pool
) -> None:
    decomposed, composed = "jose\u0301@example.com", "jos\u00e9@example.com"
    jose = await register("jose", "jose-for-now@example.com")
    await store_email(db, jose["id"], decomposed)

    await run_again(db, EMAILS_IN_NFC.read_text())

    assert await stored_email(db, jose["id"]) == composed
    for spelling in (composed, decomposed):  # the login normalizes what is typed
        assert (await login(spelling))["access_token"]
    response = await client.post("/users", json={"username": "other", "email": composed, "password": PASSWORD})
    assert response.status == 409
    assert (await response.json())["code"] == "ACCOUNT_EXISTS"


async def test_emails_that_become_one_address_stop_the_migration_naming_their_accounts(
    register: Register, db: aiopg.Pool
) -> None:
    # Case apart too: the unique index is on lower(email). Only ASCII letters
    # differ in case, which PostgreSQL folds whatever the database's locale.
    ada = await register("ada", "jos\u00e9@example.com")
    jose = await register("jose", "jose-for-now@example.com")
    grace = await register("grace")  # not one of them
    stored = "Jose\u0301@Example.com"
    await store_email(db, jose["id"], stored)

    with pytest.raises(psycopg2.errors.RaiseException, match="one address once NFC-normalized") as refused:
        await run_again(db, EMAILS_IN_NFC.read_text())

    message = str(refused.value)
    assert ada["id"] in message and jose["id"] in message
    assert grace["id"] not in message
    assert await stored_email(db, jose["id"]) == stored


def test_migrations_are_read_as_utf8_whatever_the_locale() -> None:
    # Some of ours are not ASCII (0011's comments). Read in a legacy locale's
    # encoding, their text, and so their checksums, would change.
    assert any(not text.isascii() for _, text in _migrations(MIGRATIONS))
    script = "import json, sys; from mesh_common.db import _migrations; from user_service.app import MIGRATIONS;"
    script += " json.dump(_migrations(MIGRATIONS), sys.stdout)"
    legacy = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    child = subprocess.run([sys.executable, "-c", script], env=legacy, capture_output=True, text=True, timeout=30)
    assert child.returncode == 0, child.stderr
    assert [tuple(pair) for pair in json.loads(child.stdout)] == _migrations(MIGRATIONS)
