"""A relay whose broker raised a resource alarm waits it out, and stops at once meanwhile.

RabbitMQ blocks a connection that publishes while a memory or disk alarm is
on: it reads nothing more from it, a channel's close or open included,
until the alarm clears. Against the real PostgreSQL and RabbitMQ, with the
broker's disk alarm raised by the root conftest's ``disk_alarm``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import aio_pika
import aiopg
import pytest
from aio_pika.abc import AbstractRobustConnection
from structlog.testing import capture_logs

from mesh_common.amqp import blocked
from mesh_common.events import Event
from mesh_common.outbox import enqueue
from mesh_common.relay import OutboxRelay
from mesh_common.transactions import transaction

from .relay_support import unsent

DiskAlarm = Callable[[], AbstractAsyncContextManager[None]]
CONFIRM = 0.5  # the relay's confirm timeout: its first batch in the alarm fails in 1.5 s


@pytest.fixture
async def connection(amqp_url: str) -> AsyncIterator[AbstractRobustConnection]:
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        yield connection
    finally:
        async with asyncio.timeout(10):
            await connection.close()


async def enqueued(db: aiopg.Pool) -> str:
    event = Event(type="todo.created", user_id="u", data={"id": "t"}, correlation_id="c")
    async with transaction(db) as cur:
        await enqueue(cur, event)
    return event.id


async def blocked_within(connection: AbstractRobustConnection, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not blocked(connection):
        assert time.monotonic() < deadline, "the broker never blocked the relay's connection"
        await asyncio.sleep(0.05)


async def test_a_relay_blocked_by_an_alarm_stops_at_once(
    db: aiopg.Pool, connection: AbstractRobustConnection, disk_alarm: DiskAlarm
) -> None:
    await enqueued(db)
    relay = OutboxRelay(db, connection, poll_interval=0.05, confirm_timeout=CONFIRM)
    async with disk_alarm():
        with capture_logs() as logs:
            running = asyncio.create_task(relay.run())
            try:
                # Its first batch went out, got the connection blocked, and
                # failed: the relay is now where the alarm holds it.
                await blocked_within(connection, 20)
                deadline = time.monotonic() + 20
                while not any(e["event"] == "outbox_publish_failed" for e in logs):
                    assert time.monotonic() < deadline, "the relay's batch in the alarm never failed"
                    await asyncio.sleep(0.05)
                assert not running.done()
                stopping = time.monotonic()
                relay.stop()
                # Not when the alarm clears: a channel's close, or open, waited for that.
                done, _ = await asyncio.wait({running}, timeout=10)
                assert done, "the relay did not stop while the broker blocked its connection"
                assert time.monotonic() - stopping < 1.0
            finally:
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)


async def test_a_relay_blocked_by_an_alarm_publishes_what_waited_once_it_clears(
    db: aiopg.Pool, connection: AbstractRobustConnection, disk_alarm: DiskAlarm, event_tap: Callable[..., Any]
) -> None:
    tap = await event_tap("todo.created")
    relay = OutboxRelay(db, connection, poll_interval=0.05, confirm_timeout=CONFIRM)
    running = asyncio.create_task(relay.run())
    try:
        async with disk_alarm():
            first = await enqueued(db)
            await blocked_within(connection, 20)
            second = await enqueued(db)
            assert await unsent(db) == {first, second}
        # The alarm cleared: both reach the broker, on a channel opened anew.
        # The first may come twice: its publish, left unread in the alarm,
        # is read once it clears, and the batch that failed sent it again.
        received: set[str | None] = set()
        async with asyncio.timeout(30):
            while received != {first, second}:
                received.add((await tap.next()).message_id)
                assert received <= {first, second}
        deadline = time.monotonic() + 10
        while await unsent(db):
            assert time.monotonic() < deadline, "the published events were never marked sent"
            await asyncio.sleep(0.05)
        assert not running.done(), "the relay ended"
    finally:
        relay.stop()
        async with asyncio.timeout(20):
            await asyncio.gather(running, return_exceptions=True)
