"""What PostgreSQL's limits on the service's sessions (mesh_common.db.SessionLimits) do for todos.

A lock held elsewhere (a migration's CREATE INDEX, an operator's forgotten
transaction) fails writes with a 503 and leaves no session behind, and a
transaction an instance left open on a todo lets go of it in bounded time.
Against the real PostgreSQL, with the limits shortened; the app's sessions
carry an application_name of the test's own.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

import aiopg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from mesh_common.db import DB, STATEMENT_TIMEOUT, SessionLimits
from todo_service import repository
from todo_service.settings import Settings

from .conftest import Poll, User, create

Client = TestClient[web.Request, web.Application]
SHORT = SessionLimits(lock=0.3, statement=0.5, idle_in_transaction=1.0, client_check=0.2)
POOL_SIZE = 10  # database_ctx's default, which the todo-service keeps


@pytest.fixture(autouse=True)
def short_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mesh_common.db.SESSION_LIMITS", SHORT)


@pytest.fixture
def app_name() -> str:
    return f"todo-limits-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def settings(settings: Settings, app_name: str) -> Settings:
    return replace(settings, database_url=f"{settings.database_url}?application_name={app_name}")


async def sessions(db: aiopg.Pool, app_name: str) -> list[tuple[str, str | None]]:
    """The app's sessions: (state, what each waits for)."""
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "SELECT state, wait_event_type FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = %s",
            (app_name,),
        )
        return list(await cur.fetchall())


async def count(db: aiopg.Pool, sql: str, *args: object) -> int:
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute(sql, args)
        return int((await cur.fetchone())[0])


async def test_writes_held_up_by_a_lock_elsewhere_get_a_503_and_leave_no_session_behind(
    client: Client, alice: User, db: aiopg.Pool, app_name: str, poll: Poll
) -> None:
    async def write(n: int) -> tuple[int, str]:
        async with client.post("/todos", json={"title": f"t{n}"}, headers=alice.headers) as response:
            return response.status, (await response.json(content_type=None))["code"]

    async with db.acquire() as conn, conn.cursor() as held:
        await held.execute("BEGIN")
        await held.execute("LOCK TABLE todos IN SHARE MODE")  # what CREATE INDEX holds, for as long as it runs
        try:
            # More than the pool holds: without the server's limits, each one
            # aiopg gave up on left its session waiting, and the pool opened another.
            started = asyncio.get_running_loop().time()
            answers = await asyncio.gather(*(write(n) for n in range(POOL_SIZE + 2)))
            assert set(answers) == {(503, "DEPENDENCY_UNAVAILABLE")}
            # The server gave up first, and said so: aiopg, at its own timeout, only hangs up.
            assert asyncio.get_running_loop().time() - started < STATEMENT_TIMEOUT / 2
            # None still at its statement once its client gave up: bounded, and not by the lock's end.
            await poll(lambda: _none_active(db, app_name), within=2 * SHORT.statement)
            assert len(await sessions(db, app_name)) <= POOL_SIZE + 1  # the pool, and the health check's
        finally:
            await held.execute("ROLLBACK")
    assert await count(db, "SELECT count(*) FROM todos WHERE owner_id = %s", alice.id) == 0
    assert await count(db, "SELECT count(*) FROM outbox") == 0


async def _none_active(db: aiopg.Pool, app_name: str) -> bool:
    return all(state != "active" for state, _ in await sessions(db, app_name))


async def test_a_transaction_an_instance_left_open_on_a_todo_lets_go_of_it_in_bounded_time(
    client: Client, alice: User, poll: Poll
) -> None:
    todo = await create(client, alice)
    statuses: list[int] = []

    async def renamed() -> bool:
        async with client.patch(f"/todos/{todo['id']}", json={"title": "renamed"}, headers=alice.headers) as response:
            statuses.append(response.status)
            return response.status == 200

    # What an instance paused (SIGSTOP) or cut off between its FOR UPDATE and
    # its COMMIT leaves: a session of the pool, idle in its transaction, silent.
    async with client.app[DB].acquire() as conn:
        try:
            async with conn.cursor() as cur:
                await cur.execute("BEGIN")
                assert await repository.find_todo(cur, alice.id, todo["id"], for_update=True) is not None
            # Without a limit, the lock was held as long as the pause, or until TCP gave up (about two hours).
            await poll(renamed, within=SHORT.idle_in_transaction + 3)
        finally:
            conn.close()  # ended by the server: nothing for the pool to take back
    assert set(statuses[:-1]) <= {503}  # meanwhile, the service's own answer to a lock not granted
    got = await (await client.get(f"/todos/{todo['id']}", headers=alice.headers)).json()
    assert (got["title"], got["version"]) == ("renamed", 2)
