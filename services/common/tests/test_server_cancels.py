"""A statement PostgreSQL cancels is a database error, never a silent end.

aiopg reports a statement the server cancelled (``pg_cancel_backend``, a
``statement_timeout`` set on a role or a database) as
``asyncio.CancelledError``. Against the real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiopg
import pytest
from aiohttp import web
from psycopg2.extensions import QueryCanceledError
from structlog.testing import capture_logs

from devstack.config import StackConfig
from mesh_common.app import wait_event, worker_ctx
from mesh_common.problems import problem_middleware
from mesh_common.testing import sleep_until_cancelled_by_the_server
from mesh_common.transactions import server_cancels_as_errors


@pytest.fixture
async def pool(infra: StackConfig) -> AsyncIterator[aiopg.Pool]:
    async with aiopg.create_pool(infra.database_url("todo"), minsize=1, maxsize=3) as pool:
        yield pool


async def test_aiopg_reports_it_as_a_cancellation_and_the_helper_as_the_error_it_is(pool: aiopg.Pool) -> None:
    async with asyncio.timeout(8):
        with pytest.raises(asyncio.CancelledError):  # aiopg's doing: why the helper exists
            async with pool.acquire() as conn, conn.cursor() as cur:
                await sleep_until_cancelled_by_the_server(cur, pool)
        with pytest.raises(QueryCanceledError), server_cancels_as_errors():
            async with pool.acquire() as conn, conn.cursor() as cur:
                await sleep_until_cancelled_by_the_server(cur, pool)


async def test_a_cancellation_of_the_task_itself_goes_on_as_one(pool: aiopg.Pool) -> None:
    marker = f"SELECT pg_sleep(10) -- {uuid.uuid4().hex}"

    async def statement() -> None:
        with server_cancels_as_errors():
            async with pool.acquire() as conn, conn.cursor() as cur:
                await cur.execute(marker)

    task = asyncio.create_task(statement())
    async with asyncio.timeout(5), pool.acquire() as conn, conn.cursor() as cur:
        while True:  # until the statement runs, so that the cancel interrupts it
            await cur.execute("SELECT count(*) FROM pg_stat_activity WHERE query = %s AND state = 'active'", (marker,))
            if await cur.fetchone() == (1,):
                break
            await asyncio.sleep(0.01)
    task.cancel()
    async with asyncio.timeout(8):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert task.cancelled()


async def test_a_cancellation_nobody_asked_the_task_for_is_still_one_unless_the_server_sent_it() -> None:
    # aiohttp cancels a request still running when its shutdown grace ends
    # this way: the task itself is not being cancelled.
    with pytest.raises(asyncio.CancelledError), server_cancels_as_errors():
        raise asyncio.CancelledError


async def test_a_request_whose_statement_the_server_cancels_gets_a_503(aiohttp_client: Any, pool: aiopg.Pool) -> None:
    async def handler(request: web.Request) -> web.Response:
        async with pool.acquire() as conn, conn.cursor() as cur:
            await sleep_until_cancelled_by_the_server(cur, pool)
        return web.json_response({})

    app = web.Application(middlewares=[problem_middleware])
    app.router.add_get("/", handler)
    client = await aiohttp_client(app)
    async with asyncio.timeout(8), client.get("/") as response:  # not a connection dropped unanswered
        assert response.status == 503
        assert (await response.json(content_type="application/problem+json"))["code"] == "DEPENDENCY_UNAVAILABLE"


async def test_a_worker_that_ends_while_the_app_runs_is_logged_even_as_cancelled() -> None:
    class Stray:
        async def run(self) -> None:
            raise asyncio.CancelledError  # as aiopg did, with nobody cancelling the task

        def stop(self) -> None:
            pass

    with capture_logs() as logs:
        async with worker_ctx("outbox-relay", lambda app: Stray())(web.Application()):
            async with asyncio.timeout(5):
                while not logs:
                    await asyncio.sleep(0.01)
    assert [(entry["event"], entry["worker"], entry["reason"]) for entry in logs] == [
        ("worker_ended", "outbox-relay", "cancelled")
    ]


async def test_a_stopped_worker_finishes_the_batch_in_hand_before_it_is_cancelled() -> None:
    finished: list[str] = []

    class Batching:
        def __init__(self) -> None:
            self.stopping = False

        async def run(self) -> None:
            while not self.stopping:
                started.set()
                await asyncio.sleep(0.2)  # a batch: publishes and their confirms
                finished.append("batch")

        def stop(self) -> None:
            self.stopping = True

    started = asyncio.Event()
    async with worker_ctx("outbox-relay", lambda app: Batching())(web.Application()):
        await started.wait()  # stopped mid-batch
    assert finished == ["batch"]


async def test_a_worker_that_does_not_stop_is_cancelled_after_its_grace() -> None:
    class Deaf:
        async def run(self) -> None:
            await asyncio.Event().wait()

        def stop(self) -> None:
            pass

    async with asyncio.timeout(5):
        async with worker_ctx("outbox-relay", lambda app: Deaf(), grace=0.1)(web.Application()):
            pass


async def test_a_workers_sleep_ends_as_its_event_is_set_and_says_whether_it_was() -> None:
    event = asyncio.Event()
    assert not await wait_event(event, 0.01)
    asyncio.get_running_loop().call_later(0.05, event.set)
    async with asyncio.timeout(5):  # not the 60 s asked for
        assert await wait_event(event, 60)
