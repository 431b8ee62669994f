"""Fixtures for the todo-service suite: the real PostgreSQL, RabbitMQ and Consul.

Isolation: every test starts from empty tables; events go to a RabbitMQ
virtual host of this suite's own, so that they never reach another suite's
queues (notifications.events); each test names its own upstream user-service
in Consul, so that no other instance answers for it.
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiopg
import pytest
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractQueue
from aiohttp import web
from aiohttp.test_utils import TestClient

from devstack.config import StackConfig
from mesh_common.events import EVENTS_EXCHANGE
from mesh_common.testing import LeavesConsulFirst, TokenFactory, loopback_service
from mesh_common.testing.database import MigratedDatabase
from todo_service.app import MIGRATIONS, create_app
from todo_service.settings import Settings

VHOST = "todo-service-tests"


@pytest.fixture(scope="session")
def amqp_url(amqp_vhost: Callable[[str], str]) -> str:
    return amqp_vhost(VHOST)


@pytest.fixture
def settings(infra: StackConfig, amqp_url: str) -> Settings:
    service = loopback_service("todo-service-test", infra.consul_url)
    return Settings(
        service=service,
        database_url=infra.database_url("todo"),
        amqp_url=amqp_url,
        user_service=f"user-service-test-{uuid.uuid4().hex[:12]}",
    )


@pytest.fixture
async def db(migrated_database: MigratedDatabase) -> AsyncIterator[aiopg.Pool]:
    """The todos database, migrated and emptied."""
    async with aiopg.create_pool(await migrated_database("todo", MIGRATIONS), minsize=1, maxsize=4) as pool:
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("TRUNCATE todos, idempotency_keys, outbox")
        yield pool


@pytest.fixture
def tokens() -> TokenFactory:
    return TokenFactory()


@dataclass(frozen=True)
class User:
    id: str
    headers: dict[str, str]


@pytest.fixture
def new_user(tokens: TokenFactory) -> Callable[[], User]:
    def make() -> User:
        user_id = str(uuid.uuid4())
        return User(user_id, tokens.headers(user_id))

    return make


@pytest.fixture
def alice(new_user: Callable[[], User]) -> User:
    return new_user()


@pytest.fixture
async def client(
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
    settings: Settings,
    tokens: TokenFactory,
    db: aiopg.Pool,
) -> TestClient[web.Request, web.Application]:
    return await aiohttp_client(LeavesConsulFirst(create_app(settings, verifier=tokens.verifier())))


Poll = Callable[..., Awaitable[Any]]


@pytest.fixture
def poll() -> Poll:
    """``await poll(condition, within=...)``: wait until ``condition()`` is truthy, or fail.

    ``condition`` may be sync or async; its last (truthy) result is returned.
    """

    async def wait(condition: Callable[[], Any], *, within: float = 10.0, interval: float = 0.02) -> Any:
        # The clock as well as the cut: on Python 3.11 aiopg (its wait_for)
        # can swallow the cut, and a failing test hung until pytest's timeout.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        async with asyncio.timeout_at(deadline):
            while True:
                result = condition()
                if inspect.isawaitable(result):
                    result = await result
                if result:
                    return result
                if loop.time() >= deadline:
                    raise TimeoutError(f"not true within {within} s; last: {result!r}")
                await asyncio.sleep(interval)

    return wait


class EventTap:
    """An exclusive queue bound to ``todo-mesh.events``: what was really published."""

    def __init__(self, exchange: AbstractExchange, queue: AbstractQueue) -> None:
        self._exchange = exchange
        self.queue = queue
        self._received: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

    async def start(self) -> None:
        await self.queue.consume(self._received.put, no_ack=True)

    async def next(self, within: float = 10.0) -> AbstractIncomingMessage:
        """The next message; fails after ``within`` seconds without one."""
        async with asyncio.timeout(within):
            return await self._received.get()

    async def everything_confirmed(self, routing_key: str, within: float = 10.0) -> list[AbstractIncomingMessage]:
        """Every message the broker confirmed to a publisher before this call.

        A marker is published (and confirmed) now, so it is queued behind
        all of them: receiving it means nothing confirmed earlier is missing.
        """
        marker = uuid.uuid4().hex
        await self._exchange.publish(aio_pika.Message(b"{}", message_id=marker), routing_key=routing_key)
        messages = []
        while (message := await self.next(within)).message_id != marker:
            messages.append(message)
        return messages


@pytest.fixture
async def event_tap(amqp_url: str) -> AsyncIterator[Callable[..., Awaitable[EventTap]]]:
    """``await event_tap(*routing_keys)``: a fresh queue bound with those keys."""
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)

        async def tap(*routing_keys: str) -> EventTap:
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            for key in routing_keys:
                await queue.bind(exchange, routing_key=key)
            tapped = EventTap(exchange, queue)
            await tapped.start()
            return tapped

        yield tap


async def create(client: TestClient[web.Request, web.Application], user: User, **fields: Any) -> dict[str, Any]:
    """A todo of ``user``'s, made through the API: its JSON."""
    resp = await client.post("/todos", json={"title": "Buy milk", **fields}, headers=user.headers)
    assert resp.status == 201, await resp.text()
    return await resp.json()
