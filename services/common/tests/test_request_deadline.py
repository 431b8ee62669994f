"""A request's handling ends within its deadline, and what it wrote is rolled back. Against the real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiopg
import pytest
from aiohttp import web

from devstack.config import StackConfig
from mesh_common.app import service_app
from mesh_common.testing import loopback_service
from mesh_common.transactions import transaction


@pytest.fixture
async def pool(infra: StackConfig) -> AsyncIterator[aiopg.Pool]:
    async with aiopg.create_pool(infra.database_url("todo"), minsize=1, maxsize=3) as pool:
        yield pool


@pytest.fixture
async def table(pool: aiopg.Pool) -> AsyncIterator[str]:
    name = f"deadline_probe_{uuid.uuid4().hex[:8]}"
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(f"CREATE TABLE {name} (note text)")
        yield name
        await cur.execute(f"DROP TABLE {name}")


async def test_a_request_past_its_deadline_is_a_503_and_writes_nothing(
    aiohttp_client: Any, pool: aiopg.Pool, table: str
) -> None:
    async def slow(request: web.Request) -> web.Response:
        async with transaction(pool) as cur:
            await cur.execute(f"INSERT INTO {table} VALUES ('half of the work')")
            await cur.execute("SELECT pg_sleep(0.3)")  # each statement well within its own timeout...
            await cur.execute("SELECT pg_sleep(0.3)")  # ...but not all of them within the request's
        return web.json_response({})

    app = service_app(loopback_service("slow", "unused"), deadline=0.4)
    app.router.add_post("/slow", slow)
    client = await aiohttp_client(app)
    async with client.post("/slow") as response:
        assert response.status == 503
        assert response.headers["Retry-After"] == "1"
        assert (await response.json(content_type="application/problem+json"))["code"] == "DEADLINE_EXCEEDED"
    async with asyncio.timeout(5), pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(f"SELECT count(*) FROM {table}")
        assert await cur.fetchone() == (0,)  # rolled back: nothing half-written


async def test_a_timeout_inside_the_handler_is_still_reported_as_the_dependency(aiohttp_client: Any) -> None:
    async def handler(request: web.Request) -> web.Response:
        raise TimeoutError  # a statement's or a call's own timeout, well within the deadline

    app = service_app(loopback_service("fast", "unused"), deadline=5.0)
    app.router.add_get("/", handler)
    client = await aiohttp_client(app)
    async with client.get("/") as response:
        assert response.status == 503
        assert (await response.json(content_type="application/problem+json"))["code"] == "DEPENDENCY_UNAVAILABLE"
