"""One Redis client (with its connection pool) per app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from aiohttp import web

from .app import CleanupCtx
from .health import add_health_check

REDIS = web.AppKey("mesh.redis", aioredis.Redis)


def redis_ctx(url: str, *, required: bool = True) -> CleanupCtx:
    """Open the client; ``required`` says whether an outage fails readiness (see health.py)."""

    @asynccontextmanager
    async def open_redis(app: web.Application) -> AsyncIterator[None]:
        client = aioredis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        app[REDIS] = client
        add_health_check(app, "redis", client.ping, required=required)
        try:
            yield
        finally:
            await client.aclose()

    return open_redis
