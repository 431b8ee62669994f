"""PostgreSQL's own limits on the sessions that serve requests (mesh_common.db.SessionLimits), and none on migrations.

Against the real PostgreSQL, in a schema of each test's own; its sessions
are told apart from other suites' by their application_name.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiopg
import pytest
from aiohttp import web
from psycopg2.extensions import make_dsn

from devstack.config import StackConfig
from mesh_common.app import service_app
from mesh_common.db import DB, STATEMENT_TIMEOUT, SessionLimits, database_ctx
from mesh_common.fair_pool import FairPool
from mesh_common.testing import loopback_service
from mesh_common.transactions import transaction

# Seen by a migration: the table it makes holds the limits it ran under.
SEEN = (
    "CREATE TABLE seen AS SELECT current_setting('lock_timeout') AS lock,"
    " current_setting('statement_timeout') AS statement,"
    " current_setting('idle_in_transaction_session_timeout') AS idle,"
    " current_setting('client_connection_check_interval') AS client_check;"
    " CREATE TABLE held (n int);"
)


class Scratch:
    """A schema of the test's own, and the DSN of sessions that work in it and name themselves."""

    def __init__(self, infra: StackConfig) -> None:
        self.schema = f"test_limits_{uuid.uuid4().hex[:8]}"
        self.name = f"limits-{uuid.uuid4().hex[:8]}"
        self.admin = infra.database_url("todo")
        self.dsn = make_dsn(self.admin, application_name=self.name, options=f"-c search_path={self.schema}")

    async def ours_waiting(self, cur: Any) -> int:
        """How many of the app's sessions wait for a lock."""
        await cur.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = %s AND wait_event_type = 'Lock'",
            (self.name,),
        )
        return int((await cur.fetchone())[0])


@pytest.fixture
async def scratch(infra: StackConfig, tmp_path: Path) -> AsyncIterator[Scratch]:
    made = Scratch(infra)
    (tmp_path / "0001_seen.sql").write_text(SEEN)
    async with aiopg.connect(made.admin) as conn, conn.cursor() as cur:
        await cur.execute(f"CREATE SCHEMA {made.schema}")
        try:
            yield made
        finally:
            await cur.execute(f"DROP SCHEMA {made.schema} CASCADE")


async def test_the_requests_sessions_have_the_servers_limits_and_the_migrations_none(
    aiohttp_client: Any, scratch: Scratch, tmp_path: Path
) -> None:
    app = service_app(loopback_service("svc", "http://127.0.0.1:1"))
    app.cleanup_ctx.append(database_ctx(scratch.dsn, [tmp_path]))
    client = await aiohttp_client(app)
    assert isinstance(client.app[DB], FairPool)  # first come, first served
    async with client.app[DB].acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "SELECT current_setting('lock_timeout'), current_setting('statement_timeout'),"
            " current_setting('idle_in_transaction_session_timeout'),"
            " current_setting('client_connection_check_interval'), current_schema()"
        )
        # The DSN's own options (the search_path) are kept beside them.
        assert await cur.fetchone() == ("3s", "3500ms", "10s", "1s", scratch.schema)
        await cur.execute("SELECT lock, statement, idle, client_check FROM seen")
        assert await cur.fetchone() == ("0", "0", "0", "0")


async def test_a_session_whose_request_was_cut_off_stops_waiting_for_its_lock(
    aiohttp_client: Any, scratch: Scratch, tmp_path: Path
) -> None:
    # The request's deadline, not the server, ends the wait: aiopg closes its
    # socket and cancels nothing. The lock's own limit is long here, so the
    # session can only have gone for having seen its client go.
    async def insert(request: web.Request) -> web.Response:
        async with transaction(request.app[DB]) as cur:
            await cur.execute("INSERT INTO held VALUES (1)")
        return web.Response(status=201)

    app = service_app(loopback_service("svc", "http://127.0.0.1:1"), deadline=0.5)
    app.router.add_post("/", insert)
    limits = SessionLimits(lock=3.0, statement=3.5, client_check=0.1)
    app.cleanup_ctx.append(database_ctx(scratch.dsn, [tmp_path], limits=limits))
    client = await aiohttp_client(app)
    async with aiopg.connect(scratch.dsn) as holder, holder.cursor() as held, asyncio.timeout(10):
        await held.execute("BEGIN")
        await held.execute("LOCK TABLE held IN SHARE MODE")  # what CREATE INDEX takes
        try:
            async with client.post("/") as response:
                assert response.status == 503
            loop = asyncio.get_running_loop()
            cut_at = loop.time()
            while await scratch.ours_waiting(held):  # bounded by the timeout; every 20 ms
                await asyncio.sleep(0.02)
            assert loop.time() - cut_at < limits.lock / 2  # not by the lock's own limit
        finally:
            await held.execute("ROLLBACK")
        await held.execute("SELECT count(*) FROM held")
        assert await held.fetchone() == (0,)


@pytest.mark.parametrize(
    "limits",
    [
        {"statement": STATEMENT_TIMEOUT},  # the server must give up before aiopg does
        {"lock": 3.6, "statement": 3.5},
        {"idle_in_transaction": 0},
    ],
)
def test_limits_that_would_not_be_the_first_to_act_are_refused(limits: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SessionLimits(**limits)
