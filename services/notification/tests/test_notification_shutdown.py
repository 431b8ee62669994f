"""Stopping is bounded: a delivery stuck on a dependency is cancelled, and its event comes back."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aio_pika
from notification_support import Broker, eventually, new_user, registered

from mesh_common.events import Event
from notification_service.consumer import STUCK_CANCEL_TIMEOUT, EventConsumer
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


async def test_a_delivery_still_running_after_the_drain_is_cancelled_and_its_event_redelivered(
    infra: Any, broker: Broker, topology: Topology
) -> None:
    handler = Stuck()
    event = registered(new_user())
    connection = await aio_pika.connect_robust(infra.amqp_url)
    async with connection:
        consumer = EventConsumer(connection, handler, topology, prefetch=4, retry_limit=10)
        await consumer.start()
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
