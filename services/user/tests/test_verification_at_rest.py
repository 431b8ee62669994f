"""A verification code is not kept at rest: once its event is published, no outbox row holds it.

The table holds only the code's SHA-256; the outbox held the code itself,
for the outbox's whole retention (7 days), to anyone who could read the
database, a backup or a replica. The suite's virtual host has no queue bound
for the events, so the relay cannot publish them (the broker returns them)
and the other tests read the codes from the outbox: here a queue is bound.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import aio_pika
import aiopg
import pytest
from aio_pika.abc import AbstractQueue

from mesh_common.events import EVENTS_EXCHANGE, Event
from user_service.settings import Settings

from .conftest import Client, Register

VERIFICATION = "user.email_verification_requested"


@pytest.fixture
async def published(settings: Settings) -> AsyncIterator[AbstractQueue]:
    """A private queue that receives the events registration publishes, so that the relay can publish them."""
    connection = await aio_pika.connect_robust(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(f"test-user-at-rest-{uuid.uuid4().hex[:8]}", exclusive=True)
        for routing_key in (VERIFICATION, "user.registered"):
            await queue.bind(exchange, routing_key=routing_key)
        yield queue


async def next_event(queue: AbstractQueue, routing_key: str) -> Event:
    async with asyncio.timeout(10):  # bounded: polled every 50 ms
        while True:
            message = await queue.get(fail=False)
            if message is None:
                await asyncio.sleep(0.05)
                continue
            await message.ack()
            if message.routing_key == routing_key:
                return Event.from_json(message.body)


async def outbox(db: aiopg.Pool) -> dict[str, tuple[bool, bytes]]:
    """Routing key -> (published, payload), for every row of the outbox."""
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT routing_key, published_at IS NOT NULL, payload FROM outbox")
        return {key: (published, bytes(payload)) for key, published, payload in await cur.fetchall()}


async def test_a_published_verification_code_leaves_no_outbox_row_and_user_registered_is_kept(
    client: Client, register: Register, db: aiopg.Pool, published: AbstractQueue
) -> None:
    await register("ada")
    token = str((await next_event(published, VERIFICATION)).data["token"])
    # The broker has the events before the relay's transaction commits: wait
    # for it, seen as user.registered marked (both are in one batch, as
    # they were committed together).
    async with asyncio.timeout(10):  # bounded: polled every 50 ms
        while not (rows := await outbox(db)).get("user.registered", (False, b""))[0]:
            await asyncio.sleep(0.05)
    assert list(rows) == ["user.registered"]  # published, and kept for its retention as before
    assert not any(token.encode() in payload for _, payload in rows.values())
