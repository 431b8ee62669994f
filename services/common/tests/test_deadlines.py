"""A service's deadline for a whole request: past it, a 503 and nothing half-written.

Against the real PostgreSQL, with deadlines of a fraction of a second so
that the tests do not wait for the real 4.5 s.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import aiopg
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from devstack.config import StackConfig
from mesh_common.app import service_app
from mesh_common.deadlines import ANSWER_MARGIN, COMMIT_MARGIN, DEADLINE, call_deadline
from mesh_common.discovery import Instance, ServiceWatch
from mesh_common.http import ServiceClient
from mesh_common.resilience import BreakerBoard
from mesh_common.testing import loopback_service
from mesh_common.transactions import transaction

SETTINGS = loopback_service("svc", "http://127.0.0.1:1")


@pytest.fixture
async def pool(infra: StackConfig) -> AsyncIterator[aiopg.Pool]:
    async with aiopg.create_pool(infra.database_url("todo"), minsize=1, maxsize=2) as pool:
        yield pool


@pytest.fixture
async def table(pool: aiopg.Pool) -> AsyncIterator[str]:
    name = f"deadline_{uuid.uuid4().hex[:12]}"
    # A connection for each statement, given back between them: held, the
    # handler's transaction would have to open one of its own in its time.
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(f"CREATE TABLE {name} (n int)")
    try:
        yield name
    finally:
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(f"DROP TABLE {name}")


async def rows_in(pool: aiopg.Pool, table: str) -> int:
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(f"SELECT count(*) FROM {table}")
        (count,) = await cur.fetchone()
    return int(count)


async def test_a_request_past_its_deadline_is_a_503_and_its_transaction_rolls_back(
    aiohttp_client: Any, pool: aiopg.Pool, table: str
) -> None:
    # Each statement well inside aiopg's own timeout, the whole not: what a
    # database answering slowly does to a request of several statements. The
    # deadline falls mid-statement, never as one ends: aiopg's wait_for
    # could then take the answer and drop the cancellation.
    async def handler(request: web.Request) -> web.Response:
        async with transaction(pool) as cur:
            for n in range(10):
                await cur.execute(f"INSERT INTO {table} VALUES (%s)", (n,))
                await cur.execute("SELECT pg_sleep(0.5)")
        return web.json_response({})

    app = service_app(SETTINGS, deadline=0.75)
    app.router.add_post("/", handler)
    client = await aiohttp_client(app)
    async with asyncio.timeout(5), client.post("/") as response:
        assert response.status == 503
        assert response.headers["Retry-After"] == "1"
        assert (await response.json(content_type="application/problem+json"))["code"] == "DEPENDENCY_UNAVAILABLE"
    assert await rows_in(pool, table) == 0


async def test_a_commit_begun_in_time_is_not_cut_by_the_deadline(
    aiohttp_client: Any, pool: aiopg.Pool, table: str
) -> None:
    # Cut during or after its COMMIT, the change is made and the client told
    # to retry it: a retried refresh ends the session, a retried create makes
    # a second todo. Here the work after the commit runs past the deadline.
    async def handler(request: web.Request) -> web.Response:
        async with transaction(pool) as cur:
            await cur.execute(f"INSERT INTO {table} VALUES (1)")
        await asyncio.sleep(max(0.0, request[DEADLINE] - asyncio.get_running_loop().time()) + 0.3)
        return web.json_response({})

    # Seconds more than a commit needs, however slow the machine's minute.
    app = service_app(SETTINGS, deadline=COMMIT_MARGIN + 2.0)
    app.router.add_post("/", handler)
    client = await aiohttp_client(app)
    async with asyncio.timeout(5), client.post("/") as response:
        assert response.status == 200
    assert await rows_in(pool, table) == 1


async def test_with_too_little_time_left_to_commit_the_transaction_rolls_back(
    aiohttp_client: Any, pool: aiopg.Pool, table: str
) -> None:
    async def handler(request: web.Request) -> web.Response:
        async with transaction(pool) as cur:
            await cur.execute(f"INSERT INTO {table} VALUES (1)")
            # Less than COMMIT_MARGIN left (or, on a slow minute, none).
            await asyncio.sleep(max(0.0, request[DEADLINE] - asyncio.get_running_loop().time() - COMMIT_MARGIN / 2))
        return web.json_response({})

    app = service_app(SETTINGS, deadline=1.0)
    app.router.add_post("/", handler)
    client = await aiohttp_client(app)
    async with asyncio.timeout(5), client.post("/") as response:
        assert response.status == 503
    assert await rows_in(pool, table) == 0


async def test_a_request_within_its_deadline_is_answered(aiohttp_client: Any, pool: aiopg.Pool, table: str) -> None:
    async def handler(request: web.Request) -> web.Response:
        async with transaction(pool) as cur:
            await cur.execute(f"INSERT INTO {table} VALUES (1)")
        return web.json_response({"left": request[DEADLINE] - asyncio.get_running_loop().time()})

    app = service_app(SETTINGS, deadline=30)
    app.router.add_post("/", handler)
    client = await aiohttp_client(app)
    async with client.post("/") as response:
        assert response.status == 200
        assert 25 < (await response.json())["left"] <= 30


async def test_calls_made_for_a_request_end_before_it_does(aiohttp_client: Any) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"gap": request[DEADLINE] - call_deadline(request)})  # type: ignore[operator]

    app = service_app(SETTINGS, deadline=10)
    app.router.add_get("/", handler)
    client = await aiohttp_client(app)
    async with client.get("/") as response:
        assert (await response.json())["gap"] == pytest.approx(ANSWER_MARGIN)


async def test_without_a_deadline_calls_have_only_their_own(aiohttp_client: Any) -> None:
    # The gateway's app: its routes have their own deadlines.
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"until": call_deadline(request)})

    app = service_app(SETTINGS, deadline=None)
    app.router.add_get("/", handler)
    client = await aiohttp_client(app)
    async with client.get("/") as response:
        assert await response.json() == {"until": None}


async def test_a_call_to_another_service_ends_at_the_time_it_is_given(aiohttp_server: AiohttpServer) -> None:
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({})

    upstream = web.Application()
    upstream.router.add_get("/x", hang)
    server = await aiohttp_server(upstream)
    assert server.port is not None  # started
    watch = ServiceWatch(None, "svc")  # never started: its instances are set by hand
    watch.instances = (Instance("svc-hung", "127.0.0.1", server.port),)
    try:
        async with aiohttp.ClientSession() as session:
            # Its own deadline is a minute: only ``until`` can end it within the bound.
            client = ServiceClient(session, {"svc": watch}, breakers=BreakerBoard(failure_threshold=1), deadline=60)
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(5):
                with pytest.raises(TimeoutError):
                    await client.get_json("svc", "/x", until=loop.time() + 0.2)
            # The caller ran short of time, which says nothing of the instance.
            assert not client.breakers.is_open("svc-hung")
    finally:
        release.set()
