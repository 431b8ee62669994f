"""Readiness: what every request needs is required, what some requests need is only reported."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from devstack.config import StackConfig
from mesh_common import health
from mesh_common.app import service_app
from mesh_common.db import DB, database_ctx
from mesh_common.health import add_health_check, readiness
from mesh_common.testing import loopback_service


async def ok() -> None:
    pass


async def down() -> None:
    raise ConnectionRefusedError


@pytest.mark.parametrize(
    ("database", "cache", "status", "reported"),
    [
        (ok, ok, 200, "ok"),
        (ok, down, 200, "degraded"),  # in service: only the requests that need the cache fail
        (down, ok, 503, "unavailable"),
        (down, down, 503, "unavailable"),
    ],
)
async def test_only_a_required_check_takes_an_instance_out(
    aiohttp_client: Any, database: Any, cache: Any, status: int, reported: str
) -> None:
    app = service_app(loopback_service("svc", "http://127.0.0.1:1"))
    add_health_check(app, "postgres", database)
    add_health_check(app, "redis", cache, required=False)
    client = await aiohttp_client(app)

    response = await client.get("/health")
    assert response.status == status
    body = await response.json()
    assert body["status"] == reported
    assert body["checks"] == {
        "postgres": "ok" if database is ok else "failing: ConnectionRefusedError",
        "redis": "ok" if cache is ok else "failing: ConnectionRefusedError",
    }


async def test_a_busy_database_pool_leaves_the_instance_in_service(
    aiohttp_client: Any, infra: StackConfig, tmp_path: Path
) -> None:
    # Every connection of the requests' pool taken, for longer than a check
    # may last: the database answers, so the instance is ready. Failed for
    # being busy, every instance under the same load would leave Consul.
    app = service_app(loopback_service("svc", "http://127.0.0.1:1"))
    app.cleanup_ctx.append(database_ctx(infra.database_url("todo"), [tmp_path], maxsize=2))
    client = await aiohttp_client(app)
    pool = client.app[DB]
    async with pool.acquire(), pool.acquire():
        async with asyncio.timeout(5):
            response = await client.get("/health")
        assert response.status == 200
        assert (await response.json())["checks"] == {"postgres": "ok"}


@pytest.mark.parametrize("cache", [ok, down])
@pytest.mark.parametrize("database", [ok, down])
@pytest.mark.parametrize("path", ["/health", "/health/live"])
async def test_an_instance_knows_its_readiness_once_it_has_answered_a_check(
    aiohttp_client: Any, database: Any, cache: Any, path: str
) -> None:
    # What it registers its checks with when a restarted agent forgot it.
    # Before any check is answered it may still be starting, not listening.
    app = service_app(loopback_service("svc", "http://127.0.0.1:1"))
    add_health_check(app, "postgres", database)
    add_health_check(app, "redis", cache, required=False)
    client = await aiohttp_client(app)
    assert await readiness(app) is None
    async with client.get(path, params={"instance": "another-instance"}) as response:
        assert response.status == 404
    assert await readiness(app) is None  # another instance's check: this one's port may be taken
    async with client.get(path) as response:
        assert response.status in (200, 503)
    # Docker's HEALTHCHECK, on the loopback: it says nothing of whether
    # Consul reaches the instance, which Consul may have reaped for failing.
    assert await readiness(app) is None
    async with client.get(path, params={"instance": app[health.SERVICE].instance_id}):
        pass
    assert await readiness(app) is (database is ok)  # the cache is not required


async def test_a_check_answered_long_ago_says_nothing_of_now(aiohttp_client: Any) -> None:
    # An instance Consul reaped after a minute of failed live checks, whose
    # loop still runs: registered again as passing on the strength of a check
    # answered before all that, it went back into every healthy set.
    app = service_app(loopback_service("svc", "http://127.0.0.1:1"))
    client = await aiohttp_client(app)
    async with client.get("/health/live", params={"instance": app[health.SERVICE].instance_id}):
        pass
    assert await readiness(app) is True
    answered = app[health.ANSWERED]
    assert answered.at is not None
    answered.at -= health.ANSWERED_LATELY + 1  # as long ago as that
    assert await readiness(app) is None
