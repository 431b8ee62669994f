"""A delivery that cannot be settled goes back to the broker: never lost, never stuck.

Each test breaks a private topology of its own (``own_topology``): it
deletes a queue that a republished copy needs, so the real broker returns the
copy as unroutable, as it would after someone deleted the queue by hand.
"""

from __future__ import annotations

import asyncio

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from notification_support import Management, eventually, new_user, publish, verification_requested

from devstack.config import StackConfig
from mesh_common.events import Event
from notification_service.consumer import EventConsumer
from notification_service.dlq import list_dead_letters, replay_dead_letters
from notification_service.failures import MailServerUnavailable
from notification_service.notifier import Outcome
from notification_service.topology import Topology


class AlwaysDeferred:
    """A handler whose mail server is always busy: every delivery needs a retry queue."""

    def __init__(self) -> None:
        self.calls = 0

    async def handle(self, event: Event) -> Outcome | None:
        self.calls += 1
        raise MailServerUnavailable("SMTP 451")


class FirstRequeueFails(EventConsumer):
    """Our consumer, except that its first nack fails, as on a channel in a bad state."""

    requeues_failed = 0

    async def _requeue(self, message: AbstractIncomingMessage) -> None:
        if not self.requeues_failed:
            self.requeues_failed += 1
            raise aio_pika.exceptions.ChannelInvalidStateError("the nack could not be sent")
        await super()._requeue(message)


async def waiting(channel: AbstractChannel, queue: str) -> int:
    declared = await channel.declare_queue(queue, passive=True)
    return declared.declaration_result.message_count or 0


def delivery_limit(management: Management, topology: Topology) -> int:
    return int(management.queue(topology.queue)["effective_policy_definition"]["delivery-limit"])


@pytest.mark.parametrize("consumer_class", [EventConsumer, FirstRequeueFails])
async def test_an_event_whose_retry_the_broker_returns_is_redelivered_then_dead_lettered(
    infra: StackConfig, management: Management, own_topology: Topology, consumer_class: type[EventConsumer]
) -> None:
    topology = own_topology
    handler = AlwaysDeferred()
    # The test's own connection: a robust channel would answer a passive
    # declaration from its cache, with a stale message count.
    async with (
        await aio_pika.connect_robust(infra.amqp_url) as connection,
        await aio_pika.connect_robust(infra.amqp_url) as publishing,
        await aio_pika.connect(infra.amqp_url) as ours,
    ):
        consumer = consumer_class(connection, handler, topology, publishing=publishing, prefetch=4, retry_limit=10)
        await consumer.start()
        try:
            # The first retry tier is gone: the copy for it is unroutable.
            await asyncio.to_thread(management.delete, f"/queues/%2F/{topology.retry_queues[0]}")
            channel = await ours.channel()
            event = verification_requested(new_user())
            await publish(await channel.get_exchange(topology.exchange), event)

            # Not acked as if the retry were queued (the event would be lost),
            # nor left unacked (stuck until the broker's consumer_timeout):
            # back to the broker each time, until the delivery-limit.
            await eventually(
                lambda: waiting(channel, topology.dead_letters), within=30, what="the event in the dead-letter queue"
            )
        finally:
            await consumer.stop()

    assert consumer.settled["retried"] == 0
    assert handler.calls == delivery_limit(management, topology) + 1
    [letter] = await list_dead_letters(infra.amqp_url, topology, limit=10)
    assert (letter.event_id, letter.reason) == (event.id, "delivery_limit")


async def test_a_replay_our_queue_cannot_take_leaves_the_letter_in_the_dlq(
    infra: StackConfig, management: Management, own_topology: Topology
) -> None:
    topology = own_topology
    event = verification_requested(new_user())
    async with await aio_pika.connect(infra.amqp_url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        await publish(channel.default_exchange, event, routing_key=topology.dead_letters)
        await asyncio.to_thread(management.delete, f"/queues/%2F/{topology.queue}")

        with pytest.raises(aio_pika.exceptions.DeliveryError):
            await replay_dead_letters(infra.amqp_url, topology, limit=10)

        # The replay's channel is closed, so an unacked letter is back.
        assert await eventually(lambda: waiting(channel, topology.dead_letters), within=10, what="the letter") == 1
    [letter] = await list_dead_letters(infra.amqp_url, topology, limit=10)
    assert letter.event_id == event.id
