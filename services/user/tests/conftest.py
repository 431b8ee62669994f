"""Fixtures for the user-service suite: the real PostgreSQL, Redis and RabbitMQ.

Each test starts from empty tables and its own Redis key prefix, and talks
to an app served by aiohttp's test server, kept out of Consul. Its events
go to a RabbitMQ virtual host of this suite's own.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Protocol

import aiopg
import jsonschema
import psycopg2
import pytest
import redis.asyncio as aioredis
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from devstack.config import StackConfig
from mesh_common.events import Event
from mesh_common.testing import loopback_service
from mesh_common.testing.database import MigratedDatabase
from user_service.app import MIGRATIONS, create_app
from user_service.settings import PasswordPolicy, Settings

SERVICE_SECRET = "notification-secret-0123456789"
PASSWORD = "a long and unusual passphrase"
Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def settings(infra: StackConfig, amqp_vhost: Callable[[str], str]) -> Settings:
    return Settings(
        service=loopback_service("user-service", infra.consul_url),
        database_url=infra.database_url("user"),
        redis_url=infra.redis_url,
        # user.registered goes to a virtual host of this suite's own (see amqp_vhost).
        amqp_url=amqp_vhost("user-service-tests"),
        service_clients=(("notification-service", SERVICE_SECRET),),
        redis_prefix=f"test-user-service-{uuid.uuid4().hex[:8]}:",
        # Tests that send many logins at once count their answers: on a slow
        # or busy machine the production bound on the wait for the one
        # hashing thread (3 s) would turn some into 503s. The test of that
        # bound sets its own.
        passwords=PasswordPolicy(queue_seconds=60.0),
    )


@pytest.fixture
async def db(migrated_database: MigratedDatabase) -> AsyncIterator[aiopg.Pool]:
    """A pool on the users database, migrated, and emptied before the test."""
    async with aiopg.create_pool(await migrated_database("user", MIGRATIONS), minsize=1, maxsize=2) as pool:
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("TRUNCATE users, refresh_tokens, email_verifications, signing_keys, outbox")
        yield pool


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(settings.redis_url)
    yield client
    keys = [key async for key in client.scan_iter(match=f"{settings.redis_prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, settings: Settings, db: aiopg.Pool, redis: aioredis.Redis) -> Client:
    return await aiohttp_client(create_app(settings, register=False))


@pytest.fixture
async def scratch(settings: Settings) -> AsyncIterator[aiopg.Pool]:
    """A pool whose tables live in a schema of their own, dropped afterwards."""
    schema = f"test_migrations_{uuid.uuid4().hex[:8]}"
    async with aiopg.create_pool(settings.database_url, maxsize=1, options=f"-c search_path={schema}") as pool:
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(f"CREATE SCHEMA {schema}")
        try:
            yield pool
        finally:
            async with pool.acquire() as conn, conn.cursor() as cur:
                await cur.execute(f"DROP SCHEMA {schema} CASCADE")


class Register(Protocol):
    """``register(username, email, password)``: the new account's profile, as the API answers it."""

    async def __call__(self, username: str = ..., email: str | None = ..., password: str = ...) -> dict[str, Any]: ...


class Login(Protocol):
    """``login(username, password)``: the token pair, as the API answers it."""

    async def __call__(self, username: str = ..., password: str = ...) -> dict[str, Any]: ...


Auth = Callable[[str], dict[str, str]]


@pytest.fixture
def register(client: Client) -> Register:
    async def register(username: str = "ada", email: str | None = None, password: str = PASSWORD) -> dict[str, Any]:
        body = {"username": username, "email": email or f"{username}@example.com", "password": password}
        response = await client.post("/users", json=body)
        assert response.status == 201, await response.text()
        return await response.json()

    return register


@pytest.fixture
def login(client: Client) -> Login:
    async def login(username: str = "ada", password: str = PASSWORD) -> dict[str, Any]:
        response = await client.post("/auth/login", json={"username": username, "password": password})
        assert response.status == 200, await response.text()
        return await response.json()

    return login


@pytest.fixture
def auth() -> Auth:
    """``auth(token)``: the Authorization header for a bearer token."""
    return lambda token: {"Authorization": f"Bearer {token}"}


# -- Migrations that rewrite rows ------------------------------------------------------
async def store_email(db: aiopg.Pool, user_id: str, email: str) -> None:
    """Store ``email`` as it is, past the validation that normalizes it: a row from before."""
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("UPDATE users SET email = %s WHERE id = %s", (email, user_id))


async def stored_email(db: aiopg.Pool, user_id: str) -> str:
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT email FROM users WHERE id = %s", (user_id,))
        row = await cur.fetchone()
        assert row is not None
        return str(row[0])


async def run_again(db: aiopg.Pool, migration: str) -> None:
    """A migration's SQL (``migration``) once more, in a transaction of its own as migrate() runs it.

    It ran when the fixture migrated the (then empty) tables: run again, on
    rows stored since, it does what it does to old rows. It must leave no
    function behind in the session it ran in.
    """
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("BEGIN")
        try:
            await cur.execute(migration)
            await cur.execute("COMMIT")
        except psycopg2.Error:
            await cur.execute("ROLLBACK")
            raise
        await cur.execute("SELECT count(*) FROM pg_proc WHERE pronamespace = pg_my_temp_schema()")
        assert await cur.fetchone() == (0,)


ASYNCAPI = Path(__file__).resolve().parents[3] / "docs" / "asyncapi.yaml"


def assert_matches_contract(event: Event, schema: str) -> None:
    """``event``, as it is written to the broker, is valid against ``schema`` of docs/asyncapi.yaml."""
    contract = yaml.safe_load(ASYNCAPI.read_text())
    document = {"$ref": f"#/components/schemas/{schema}", "components": contract["components"]}
    jsonschema.Draft202012Validator(document, format_checker=jsonschema.FormatChecker()).validate(
        json.loads(event.to_json())
    )
