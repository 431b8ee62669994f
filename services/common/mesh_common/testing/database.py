"""A test database that recovers from an edited migration: dropped, made again, migrated.

A test stack's databases outlive a run. Once a migration already applied
there is edited, or a branch with other ones is checked out, ``migrate``
refuses it for good (``migration X was changed after it was applied``), as
it must in production; a test database holds nothing worth keeping, and
every test that used it failed until someone deleted the stack's data by hand.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import aiopg
from psycopg2 import sql
from psycopg2.extensions import parse_dsn

from ..db import migrate

# The root conftest.py's ``migrated_database`` fixture: ``await migrated_database(service, migrations)``,
# the URL of that service's test database, migrated.
MigratedDatabase = Callable[[str, Sequence[Path]], Awaitable[str]]

CHANGED = re.compile(r"migration \S+ was changed after it was applied")
# Any constant: one remaker at a time, on the server's maintenance database.
_REMAKE_LOCK = 0x70D0_7E57


async def migrate_test_database(url: str, migrations: Sequence[Path], *, admin_url: str) -> str | None:
    """Migrate the database at ``url``; if that fails on an edited migration, make it again first.

    ``admin_url``: a superuser's, on another database of the same server,
    that drops the database (with the connections to it) and creates it
    again, owned by ``url``'s user. Returns what was done and why, or None.
    """
    if await _edited(url, migrations) is None:
        return None
    params = parse_dsn(url)
    database, owner = sql.Identifier(params["dbname"]), sql.Identifier(params["user"])
    async with aiopg.connect(admin_url) as admin, admin.cursor() as cur:
        # Another test run of the same checkout meets the same edit: one of
        # them makes it again, and the other finds it migrated already.
        await cur.execute("SELECT pg_advisory_lock(%s)", (_REMAKE_LOCK,))
        if (reason := await _edited(url, migrations)) is None:
            return None
        for statement in (
            sql.SQL("DROP DATABASE {} WITH (FORCE)").format(database),
            sql.SQL("CREATE DATABASE {} OWNER {}").format(database, owner),
        ):
            await cur.execute(statement.as_string(admin.raw))
        await _migrate(url, migrations)
    return f"the test database {params['dbname']} was dropped and made again: {reason}"


async def _edited(url: str, migrations: Sequence[Path]) -> str | None:
    """Migrate the database at ``url``; what ``migrate`` said if an applied migration was edited since."""
    try:
        await _migrate(url, migrations)
    except RuntimeError as exc:
        if not CHANGED.fullmatch(str(exc)):
            raise
        return str(exc)
    return None


async def _migrate(url: str, migrations: Sequence[Path]) -> None:
    async with aiopg.create_pool(url, minsize=1, maxsize=1) as pool:
        await migrate(pool, migrations)
