"""What the login throttle leaves in Redis: keys that say nothing of what was typed, the same on every instance."""

from __future__ import annotations

import asyncio
import hashlib

import aiopg
import redis.asyncio as aioredis
from pytest_aiohttp import AiohttpClient

from mesh_common.db import migrate
from user_service.app import MIGRATIONS, create_app
from user_service.settings import Settings
from user_service.throttle import load_throttle_key

from .conftest import PASSWORD, Client

# A password, typed into the username box: the throttle counts it as a name.
TYPED = "Summer2024!"


async def slot_keys(redis: aioredis.Redis, settings: Settings) -> list[str]:
    return sorted([key.decode() async for key in redis.scan_iter(match=f"{settings.redis_prefix}login-slots:*")])


async def test_a_typed_name_is_counted_under_a_keyed_hash_shared_by_every_instance(
    aiohttp_client: AiohttpClient, settings: Settings, client: Client, redis: aioredis.Redis
) -> None:
    other_instance = await aiohttp_client(create_app(settings, register=False))
    for n in range(10):
        response = await (client, other_instance)[n % 2].post(
            "/auth/login", json={"username": TYPED, "password": PASSWORD}
        )
        assert response.status == 401

    # One key for both instances, so the limit holds across them...
    (key,) = await slot_keys(redis, settings)
    assert await redis.zcard(key) == 10
    later = await aiohttp_client(create_app(settings, register=False))  # and across a restart
    for instance in (client, other_instance, later):
        response = await instance.post("/auth/login", json={"username": TYPED, "password": PASSWORD})
        assert response.status == 429
    # ...and not one that hashing common passwords, spelled as the throttle
    # folds and prefixes them, finds again: it is keyed with a secret Redis never sees.
    digest = key.rpartition(":")[2]
    for guess in (TYPED, TYPED.lower(), f"name:{TYPED}", f"name:{TYPED.lower()}"):
        assert digest != hashlib.sha256(guess.encode()).hexdigest(), guess


async def test_instances_starting_together_on_a_new_database_make_one_throttle_key(
    scratch: aiopg.Pool, settings: Settings
) -> None:
    await migrate(scratch, MIGRATIONS)
    async with scratch.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT current_schema()")
        (schema,) = await cur.fetchone()
    # Connections of their own, so that the first INSERTs really race: a
    # plain INSERT would fail on the primary key for all but one.
    options = f"-c search_path={schema}"
    async with aiopg.create_pool(settings.database_url, minsize=5, maxsize=5, options=options) as pool:
        async with asyncio.timeout(30):
            secrets = await asyncio.gather(*(load_throttle_key(pool) for _ in range(5)))
    assert len(set(secrets)) == 1 and len(secrets[0]) == 32
    async with scratch.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT count(*) FROM login_throttle_key")
        assert await cur.fetchone() == (1,)
