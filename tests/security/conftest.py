"""A live user-service app for the security suites: real PostgreSQL, Redis and RabbitMQ."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable

import aiopg
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from devstack.config import StackConfig
from mesh_common.testing import loopback_service
from mesh_common.testing.database import MigratedDatabase
from user_service.app import MIGRATIONS, create_app
from user_service.settings import Settings


@pytest.fixture
async def user_service(
    aiohttp_client: AiohttpClient,
    infra: StackConfig,
    amqp_vhost: Callable[[str], str],
    migrated_database: MigratedDatabase,
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    """A test client of a user-service on empty tables, outside Consul."""
    settings = Settings(
        service=loopback_service("user-service", infra.consul_url),
        database_url=await migrated_database("user", MIGRATIONS),
        redis_url=infra.redis_url,
        amqp_url=amqp_vhost("security-tests"),
        redis_prefix=f"test-security-{uuid.uuid4().hex[:8]}:",
    )
    async with (
        aiopg.create_pool(settings.database_url, minsize=1, maxsize=1) as pool,
        pool.acquire() as conn,
        conn.cursor() as cur,
    ):
        await cur.execute("TRUNCATE users, refresh_tokens, email_verifications, signing_keys, outbox")
    yield await aiohttp_client(create_app(settings, register=False))
    redis = aioredis.from_url(settings.redis_url)
    keys = [key async for key in redis.scan_iter(match=f"{settings.redis_prefix}*")]
    if keys:
        await redis.delete(*keys)
    await redis.aclose()
