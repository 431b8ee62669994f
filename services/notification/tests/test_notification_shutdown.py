"""Stopping is bounded: a delivery stuck on a dependency is cancelled, and its event comes back;
and the service's workers stop side by side, not one after the other."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import aiopg
import pytest
from notification_support import (
    Broker,
    FakeUserService,
    StartService,
    eventually,
    new_user,
    todo_event,
    verification_requested,
)
from smtp_sink import SmtpSink, silent_smtp

from devstack.config import StackConfig
from mesh_common.events import Event
from notification_service import workers
from notification_service.consumer import STUCK_CANCEL_TIMEOUT, EventConsumer
from notification_service.keys import CONSUMER, NOTIFIER, STOPS
from notification_service.notifier import Outcome
from notification_service.topology import Topology

DRAIN = 0.5


class Stuck:
    """A handler waiting on a dependency that never answers, and no timeout of its own."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = False

    async def handle(self, event: Event) -> Outcome | None:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return None


@asynccontextmanager
async def consuming(infra: StackConfig, handler: Any, topology: Topology) -> AsyncIterator[EventConsumer]:
    """A consumer started on connections of its own, closed after."""
    async with (
        await aio_pika.connect_robust(infra.amqp_url) as connection,
        await aio_pika.connect_robust(infra.amqp_url) as publishing,
    ):
        consumer = EventConsumer(connection, handler, topology, publishing=publishing, prefetch=4, retry_limit=10)
        await consumer.start()
        yield consumer


async def test_a_delivery_still_running_after_the_drain_is_cancelled_and_its_event_redelivered(
    infra: StackConfig, broker: Broker, topology: Topology
) -> None:
    handler = Stuck()
    event = verification_requested(new_user())
    async with consuming(infra, handler, topology) as consumer:
        await broker.publish(event)
        await asyncio.wait_for(handler.started.wait(), timeout=10)

        started = time.monotonic()
        await asyncio.wait_for(consumer.stop(drain_timeout=DRAIN), timeout=DRAIN + STUCK_CANCEL_TIMEOUT + 5)
        # Cancelled, not left running on a connection about to close.
        assert handler.cancelled
        assert time.monotonic() - started < DRAIN + STUCK_CANCEL_TIMEOUT
    # Never acked: with the connection gone, the broker has the event again.
    await eventually(lambda: broker.ready(topology.queue), within=10, what="the event back in the queue")
    assert await broker.ready(topology.queue) == 1


class Handled:
    def __init__(self) -> None:
        self.events: list[str] = []

    async def handle(self, event: Event) -> Outcome | None:
        self.events.append(event.id)
        return Outcome.SENT


async def test_an_event_in_hand_at_more_restarts_than_the_old_delivery_limit_is_still_delivered(
    infra: StackConfig, broker: Broker, topology: Topology, delivery_limit: int
) -> None:
    # RabbitMQ 3.x counts a channel closing with the delivery unsettled
    # against the queue's delivery-limit, as it counts a nack. With a limit of
    # 5 (what a nack per bug needed), the sixth restart of a consumer holding
    # a good event dead-lettered it; bugs are counted by the consumer now.
    event = verification_requested(new_user())
    await broker.publish(event)
    restarts = 6
    for _ in range(restarts):
        handler = Stuck()
        async with consuming(infra, handler, topology) as consumer:
            await asyncio.wait_for(handler.started.wait(), timeout=10)
            await consumer.stop(drain_timeout=0.1)
        assert handler.cancelled  # handed back unsettled, by the channel closing

    handled = Handled()
    async with consuming(infra, handled, topology) as consumer:
        try:
            await eventually(lambda: handled.events, within=10, what="the event, after the restarts")
        finally:
            await consumer.stop()
    assert handled.events == [event.id]
    assert await broker.ready(topology.dead_letters) == 0
    assert restarts < delivery_limit


async def test_the_consumer_and_the_reminder_scheduler_stop_side_by_side(
    start_service: Any, settings: Any, broker: Broker, users: FakeUserService, monkeypatch: Any
) -> None:
    # An SMTP server that takes the connection and never greets: the
    # scheduler's round hangs until its stop gives up on it. One after the
    # other, the consumer's drain began only then (20 s in all with the
    # default bounds, past compose's grace period).
    monkeypatch.setattr(workers, "SCHEDULER_STOP_TIMEOUT", 2.0)
    stops: dict[str, float] = {}
    consumer_stop = EventConsumer.stop

    async def timed_stop(consumer: EventConsumer, **kwargs: Any) -> None:
        stops["consumer"] = time.monotonic()
        await consumer_stop(consumer, **kwargs)

    monkeypatch.setattr(EventConsumer, "stop", timed_stop)
    async with silent_smtp() as silent:
        hung = dataclasses.replace(settings.smtp, port=silent.port, timeout=30.0)
        client = await start_service(smtp=hung)
        owner = users.add(new_user())
        due = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        todo = {"id": "t-stop", "title": "Stop", "due_at": due, "completed": False, "version": 1}
        await broker.publish(todo_event("created", owner["id"], todo))
        await eventually(lambda: silent.accepted, within=10, what="the reminder's SMTP connection")
        stopping = time.monotonic()
        await client.close()
        stopped = time.monotonic()
    assert stops["consumer"] - stopping < 1.0, "the consumer waited for the scheduler to stop"
    assert stopped - stopping < 2.0 + 2.0 + 2.0  # the scheduler's bound, its unwinding, and slack


async def test_a_delivery_waiting_for_an_smtp_session_at_shutdown_gives_its_event_back_unsent(
    start_service: StartService, broker: Broker, smtp: SmtpSink, pool: aiopg.Pool, topology: Topology
) -> None:
    # Waiting for a session, it took one during the drain and began its send,
    # which the drain's end could cut short in DATA: sent again after the restart.
    client = await start_service()
    notifier, consumer = client.app[NOTIFIER], client.app[CONSUMER]
    notifier._mailer._slots = asyncio.Semaphore(1)  # every session busy but this one
    smtp.data_gate = asyncio.Event()  # the server holds the first email until the shutdown has begun
    sending, waiting = verification_requested(new_user()), verification_requested(new_user())
    await broker.publish(sending)
    await eventually(lambda: smtp.received, within=10, what="the first email in DATA, holding the session")
    await broker.publish(waiting)
    await eventually(lambda: len(consumer._in_flight) == 2, within=10, what="the second delivery under way")

    closing = asyncio.create_task(client.close())
    try:
        await eventually(lambda: "consumer" in client.app[STOPS]._running, within=5, what="the drain begun")
        smtp.data_gate.set()
        await asyncio.wait_for(asyncio.shield(closing), timeout=15)
    finally:
        smtp.data_gate.set()
        await closing

    assert len(smtp.received) == 1  # the send under way finished; the other never began
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT event_id::text, status FROM notifications")
        assert await cur.fetchall() == [(sending.id, "sent")]  # nothing claimed for the other
    assert consumer.settled["requeued"] == 1
    await eventually(lambda: broker.ready(topology.queue), within=10, what="the event given back")


async def refused(*args: Any, **kwargs: Any) -> None:
    raise aio_pika.exceptions.ChannelInvalidStateError("the channel is closed")


async def cut_swallowed_into_an_error(*args: Any, **kwargs: Any) -> None:
    try:
        await asyncio.sleep(DRAIN * 10)  # the broker slow to answer
    except asyncio.CancelledError:
        # As asyncio.wait_for does on Python 3.11 when the answer lands
        # with the cut: the cut comes out as the answer's error.
        raise aio_pika.exceptions.ChannelInvalidStateError("the channel is closed") from None


@pytest.mark.parametrize("cancel", [refused, cut_swallowed_into_an_error])
async def test_a_consumer_whose_cancel_fails_still_ends_the_deliveries_in_hand(
    infra: StackConfig,
    broker: Broker,
    topology: Topology,
    monkeypatch: pytest.MonkeyPatch,
    cancel: Callable[..., Awaitable[None]],
) -> None:
    handler = Stuck()
    async with consuming(infra, handler, topology) as consumer:
        await broker.publish(verification_requested(new_user()))
        await asyncio.wait_for(handler.started.wait(), timeout=10)
        monkeypatch.setattr(type(consumer._queue), "cancel", cancel)  # slotted: patched on its class
        await asyncio.wait_for(consumer.stop(drain_timeout=DRAIN), timeout=DRAIN + STUCK_CANCEL_TIMEOUT + 5)
        # Not left running on a connection about to close.
        assert handler.cancelled


async def test_a_consumer_whose_cancel_swallows_the_drains_cut_does_not_wait_for_ever_to_close(
    infra: StackConfig, topology: Topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with consuming(infra, Stuck(), topology) as consumer:

        async def swallowing(*args: Any, **kwargs: Any) -> None:
            with contextlib.suppress(asyncio.CancelledError):  # the answer came with the cut, and won
                await asyncio.sleep(DRAIN * 10)

        async def unanswered(*args: Any, **kwargs: Any) -> None:
            await asyncio.sleep(60)  # aiormq's own bound on a close is the heartbeat's: 60 s by default

        monkeypatch.setattr(type(consumer._queue), "cancel", swallowing)
        monkeypatch.setattr(type(consumer._channel), "close", unanswered)
        started = time.monotonic()
        await asyncio.wait_for(consumer.stop(drain_timeout=DRAIN), timeout=DRAIN + 5)
        assert time.monotonic() - started < DRAIN + 1
        monkeypatch.undo()  # the connections' own closes close the channels
