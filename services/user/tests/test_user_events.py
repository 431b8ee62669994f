"""user.registered and user.password_changed leave through the outbox and reach RabbitMQ."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import aio_pika
import aiopg
import pytest
import redis.asyncio as aioredis
from aio_pika.abc import AbstractQueue
from pytest_aiohttp import AiohttpClient

from mesh_common.events import EVENTS_EXCHANGE, Event
from mesh_common.outbox import OUTBOX_COMMITTED
from user_service.app import create_app
from user_service.settings import Settings

from .conftest import Client, Register, assert_matches_contract

PASSWORD = "a long and unusual passphrase"


@contextlib.asynccontextmanager
async def bound_queue(settings: Settings, routing_key: str) -> AsyncIterator[AbstractQueue]:
    """A private queue that receives every event published with ``routing_key``."""
    connection = await aio_pika.connect_robust(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(f"test-{routing_key}-{uuid.uuid4().hex[:8]}", exclusive=True)
        await queue.bind(exchange, routing_key=routing_key)
        yield queue


@pytest.fixture
async def registrations(settings: Settings) -> AsyncIterator[AbstractQueue]:
    async with bound_queue(settings, "user.registered") as queue:
        yield queue


async def next_event(queue: AbstractQueue) -> Event:
    async with asyncio.timeout(5.0):
        while True:
            message = await queue.get(fail=False)
            if message is not None:
                await message.ack()
                return Event.from_json(message.body)
            await asyncio.sleep(0.05)


async def test_registration_publishes_user_registered_with_the_request_id(
    client: Client, registrations: AbstractQueue
) -> None:
    body = {"username": "ada", "email": "ada@example.com", "password": PASSWORD, "display_name": "Ada"}
    response = await client.post("/users", json=body, headers={"X-Request-ID": "req-register-ada"})
    user = await response.json()

    event = await next_event(registrations)
    assert event.type == "user.registered"
    assert event.correlation_id == "req-register-ada"
    assert event.user_id == user["id"]
    assert event.data == {"user_id": user["id"], "username": "ada", "email": "ada@example.com", "display_name": "Ada"}


async def test_a_password_change_publishes_user_password_changed_matching_its_contract(
    client: Client, register: Register, settings: Settings
) -> None:
    ada = await register("ada")
    tokens = await (await client.post("/auth/login", json={"username": "ada", "password": PASSWORD})).json()
    async with bound_queue(settings, "user.password_changed") as changes:
        response = await client.post(
            "/users/me/password",
            json={"current_password": PASSWORD, "new_password": "another long passphrase"},
            headers={"Authorization": f"Bearer {tokens['access_token']}", "X-Request-ID": "req-new-password"},
        )
        assert response.status == 200, await response.text()
        event = await next_event(changes)

    assert (event.type, event.user_id, event.correlation_id) == ("user.password_changed", ada["id"], "req-new-password")
    assert event.data == {
        "user_id": ada["id"],
        "username": "ada",
        "display_name": ada["display_name"],
        "email": "ada@example.com",
        "email_verified": False,
    }
    assert_matches_contract(event, "UserPasswordChangedEvent")


async def test_user_registered_matches_its_asyncapi_contract(
    client: Client, register: Register, registrations: AbstractQueue
) -> None:
    await register("ada")
    event = await next_event(registrations)
    assert_matches_contract(event, "UserRegisteredEvent")


async def test_a_refused_registration_publishes_nothing(
    client: Client, register: Register, registrations: AbstractQueue
) -> None:
    await register("ada")
    first = await next_event(registrations)
    duplicate = await client.post("/users", json={"username": "ADA", "email": "x@example.com", "password": PASSWORD})
    assert duplicate.status == 409
    await register("grace")
    # Events arrive in order: the next one is grace's, nothing came in between.
    assert (await next_event(registrations)).data["username"] == "grace"
    assert first.data["username"] == "ada"


class CountedSets(asyncio.Event):
    """An ``asyncio.Event`` that counts who set it."""

    def __init__(self) -> None:
        super().__init__()
        self.sets = 0

    def set(self) -> None:
        self.sets += 1
        super().set()


async def test_a_registration_wakes_the_outbox_relay_once_committed(
    aiohttp_client: AiohttpClient, settings: Settings, db: aiopg.Pool, redis: aioredis.Redis
) -> None:
    app = create_app(settings, register=False)
    app[OUTBOX_COMMITTED] = committed = CountedSets()
    client = await aiohttp_client(app)
    body = {"username": "ada", "email": "ada@example.com", "password": PASSWORD}
    assert (await client.post("/users", json=body)).status == 201
    assert committed.sets == 1
    # A refused one commits nothing, and wakes no one.
    assert (await client.post("/users", json=body)).status == 409
    assert committed.sets == 1
