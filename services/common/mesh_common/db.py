"""PostgreSQL through aiopg, and versioned SQL migrations applied at start-up.

Migrations are plain ``NNNN_name.sql`` files applied in order, each in its own
transaction, under an advisory lock so that instances starting together do
not race. Applied versions are kept in ``schema_migrations``, with a checksum
that must never change.

A service's migrations are its own directory followed by the shared sets it
uses (``mesh_common.outbox.OUTBOX_MIGRATIONS``), each applied in file-name
order, one directory after the other. A version names a file without its
directory, so shared files carry their set's name (``outbox_0001_table``).
On a new database a shared set runs after all of the service's own files, so
those must not rely on it. A recorded version without a file is left alone:
``0004_outbox`` of the user- and todo-services was the outbox before it
became a shared set.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import aiopg
import psycopg2
import structlog
from aiohttp import web
from psycopg2.extensions import make_dsn, parse_dsn

from .app import CleanupCtx
from .fair_pool import fair_pool
from .health import add_health_check

DB = web.AppKey("mesh.db", aiopg.Pool)
log = structlog.get_logger()

_LOCK_ID = 0x70D0_3E54  # any constant: one migrator per database at a time
# Every connect and statement through the pool, as aiopg waits for them
# (the server's own limits, SessionLimits, are shorter). Shorter than the
# gateway's route deadline (5 s): a database that hangs ends in the service's
# own 503 DEPENDENCY_UNAVAILABLE, which says why, before the gateway gives up
# with a bare 504 (tests/config/test_timeouts.py keeps them in step).
STATEMENT_TIMEOUT = 4.0
# That suits requests, not migrations: an instance waits for the lock while
# another migrates, and an index on a large table takes what it takes. Cut
# off, either would fail every start.
MIGRATION_TIMEOUT = 30 * 60.0


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """What PostgreSQL itself enforces on the sessions that serve requests, in seconds.

    aiopg's timeout only stops waiting: it closes its socket and cancels
    nothing on the server. A session waiting for a lock (a migration's
    ``CREATE INDEX``, an operator's forgotten ``BEGIN ... FOR UPDATE``)
    never reads that socket, so it went on waiting, while the pool opened a
    new connection for the next request: sessions piled up past the pool's
    size until PostgreSQL's max_connections refused every service.

    - ``lock``, ``statement``: the server gives up first, below aiopg's
      ``STATEMENT_TIMEOUT``, and says so on a connection still usable:
      ``LockNotAvailable`` and ``QueryCanceledError``, both OperationalErrors,
      the problem middleware's 503 after the transaction rolled back. A lock
      waited for is the commonest case, and its error the clearer, so its
      limit is the shorter.
    - ``client_check``: a session whose client went away all the same (a
      request's deadline cut it mid-statement) finds out within this time,
      and ends, rather than at its statement's limit (PostgreSQL 14 or
      later; both stacks run 15).
    - ``idle_in_transaction``: a transaction left open by a paused or
      cut-off instance (between its ``FOR UPDATE`` and its COMMIT) ends, and
      its locks with it; not two hours later, when TCP gives up. Nothing
      holds a request's transaction open while it waits on anything else;
      the outbox relay, which waits on the broker, sets its own (relay.py).

    Migrations have none of these (``database_ctx``): an index on a large
    table takes what it takes.
    """

    lock: float = 3.0
    statement: float = 3.5
    idle_in_transaction: float = 10.0
    client_check: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.lock <= self.statement < STATEMENT_TIMEOUT:
            raise ValueError(f"want 0 < lock <= statement < aiopg's {STATEMENT_TIMEOUT} s: {self}")
        if self.idle_in_transaction <= 0 or self.client_check <= 0:
            raise ValueError(f"limits must be positive: {self}")

    def options(self) -> str:
        """The limits as libpq's ``options``: set as each session starts, in milliseconds."""
        limits = {
            "lock_timeout": self.lock,
            "statement_timeout": self.statement,
            "idle_in_transaction_session_timeout": self.idle_in_transaction,
            "client_connection_check_interval": self.client_check,
        }
        return " ".join(f"-c {name}={max(1, round(seconds * 1000))}" for name, seconds in limits.items())

    def dsn(self, dsn: str) -> str:
        """``dsn`` with these limits; an ``options`` of its own comes after them, and wins."""
        own = parse_dsn(dsn).get("options", "")
        return make_dsn(dsn, options=f"{self.options()} {own}".strip())


# Those of every service's requests' pool unless it passes its own; read as
# the pool opens (a test's monkeypatch shortens them).
SESSION_LIMITS = SessionLimits()


def _migrations(directories: Sequence[Path]) -> list[tuple[str, str]]:
    # A missing folder would otherwise read as "no migrations": the service
    # would start on a database without its tables, as it once did from a
    # wheel that left its SQL behind.
    if missing := [str(directory) for directory in directories if not directory.is_dir()]:
        raise RuntimeError(f"migration folders not found: {missing}")
    # UTF-8 whatever the locale says: under a legacy one, a file with an "é"
    # would read as other text, and fail its checksum or apply as other SQL.
    found = [
        (p.stem, p.read_text(encoding="utf-8")) for directory in directories for p in sorted(directory.glob("*.sql"))
    ]
    versions = [version for version, _ in found]
    if shared := sorted({version for version in versions if versions.count(version) > 1}):
        raise RuntimeError(f"migrations in more than one directory: {shared}")
    return found


async def migrate(pool: aiopg.Pool, directories: Sequence[Path]) -> list[str]:
    migrations = _migrations(directories)  # a missing folder fails here, before any lock or table
    applied_now: list[str] = []
    async with pool.acquire() as conn, conn.cursor(timeout=MIGRATION_TIMEOUT) as cur:
        await cur.execute("SELECT pg_advisory_lock(%s)", (_LOCK_ID,))
        try:
            await cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, checksum text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            await cur.execute("SELECT version, checksum FROM schema_migrations")
            applied = dict(await cur.fetchall())
            for version, sql in migrations:
                checksum = hashlib.sha256(sql.encode()).hexdigest()
                if version in applied:
                    if applied[version] != checksum:
                        raise RuntimeError(f"migration {version} was changed after it was applied")
                    continue
                await cur.execute("BEGIN")
                try:
                    await cur.execute(sql)
                    await cur.execute(
                        "INSERT INTO schema_migrations (version, checksum) VALUES (%s, %s)", (version, checksum)
                    )
                    await cur.execute("COMMIT")
                except BaseException:
                    # On a connection aiopg closed (a timeout, a cancel) the
                    # ROLLBACK fails too, and must not hide why we got here.
                    with suppress(psycopg2.Error):
                        await cur.execute("ROLLBACK")
                    raise
                applied_now.append(version)
        finally:
            # aiopg closes a connection whose statement timed out; the lock
            # went with its session, and the error that closed it is the one to see.
            if not conn.closed:
                await cur.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_ID,))
    if applied_now:
        log.info("migrations_applied", versions=applied_now)
    return applied_now


async def _in_utc(conn: aiopg.Connection) -> None:
    # Timestamps come back in the session's time zone. A server set to
    # another zone would hand 9999-12-31T23:59:59Z back as the year 10000,
    # which psycopg2 cannot read: a 500 for a value it had just accepted.
    async with conn.cursor() as cur:
        await cur.execute("SET TIME ZONE 'UTC'")


def database_ctx(
    dsn: str, migrations: Sequence[Path], *, maxsize: int = 10, limits: SessionLimits | None = None
) -> CleanupCtx:
    """The requests' pool (``DB``), its sessions under ``limits`` (``SESSION_LIMITS``); migrated first."""

    @asynccontextmanager
    async def open_database(app: web.Application) -> AsyncIterator[None]:
        limited = (limits or SESSION_LIMITS).dsn(dsn)
        # On a connection of their own, without the requests' limits: one
        # instance waits for the advisory lock while another migrates, and a
        # migration holds its tables for as long as it takes.
        async with aiopg.create_pool(dsn, minsize=0, maxsize=1, timeout=STATEMENT_TIMEOUT, on_connect=_in_utc) as own:
            await migrate(own, migrations)
        async with (
            # First come, first served (fair_pool.py): aiopg's own pool let a
            # few requests wait for seconds under load, behind newer ones.
            fair_pool(limited, minsize=1, maxsize=maxsize, timeout=STATEMENT_TIMEOUT, on_connect=_in_utc) as pool,
            # The health check's own connection. From the requests' pool, a
            # burst that held every connection for the check's 1.5 s failed
            # it: Consul took the instance out for being busy, and, the load
            # being the same everywhere, every other instance with it.
            aiopg.create_pool(limited, minsize=0, maxsize=1, timeout=STATEMENT_TIMEOUT) as probe,
        ):
            app[DB] = pool

            async def ping() -> None:
                async with probe.acquire() as conn, conn.cursor() as cur:
                    await cur.execute("SELECT 1")

            add_health_check(app, "postgres", ping)
            yield

    return open_database
