"""The consumer's copies and the connection they go out on: a reconnect is waited out, a lost channel settles nothing.

Each test runs a consumer of its own on a private topology (``own_topology``),
on two robust connections as the service opens them (mesh_common.amqp). The
publishing one goes through a ``TcpProxy``, cut to keep it down while the
consuming one stays up: the broker's own close of a connection (management
API) is followed by aio-pika's reconnect within milliseconds, too soon to
test by, and a proxy touches nothing other suites share.
"""

from __future__ import annotations

import time

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from notification_support import eventually, new_user, publish, verification_requested
from yarl import URL

from devstack.config import StackConfig
from mesh_common.events import Event
from mesh_common.testing.proxy import TcpProxy
from notification_service.consumer import EventConsumer
from notification_service.dlq import list_dead_letters
from notification_service.failures import MailServerUnavailable
from notification_service.notifier import Outcome
from notification_service.publisher import CopyPublisher
from notification_service.topology import Topology

EVENTS = 5


class Deferred:
    """A handler whose mail server is busy, at once, for the first ``failures`` deliveries (all, if None)."""

    def __init__(self, failures: int | None = None) -> None:
        self.failures = failures
        self.calls = 0

    async def handle(self, event: Event) -> Outcome | None:
        self.calls += 1
        if self.failures is None or self.calls <= self.failures:
            raise MailServerUnavailable("SMTP 451")
        return None


async def waiting(channel: AbstractChannel, queue: str) -> int:
    declared = await channel.declare_queue(queue, passive=True)
    return declared.declaration_result.message_count or 0


async def cut(proxy: TcpProxy, publishing: AbstractRobustConnection) -> None:
    """The publishing connection down, and seen down by the client, until the proxy starts again."""
    await proxy.cut()
    await eventually(lambda: not publishing.connected.is_set(), within=10, what="the publishing connection down")


async def test_copies_wait_while_the_publishing_connection_reconnects_and_nothing_is_dead_lettered(
    infra: StackConfig, own_topology: Topology
) -> None:
    # aio-pika's publish raised at once on the channel being restored: each
    # delivery was given back, came straight back, failed again, and was
    # dead-lettered (delivery_limit) within a second.
    topology, handler, proxy = own_topology, Deferred(), TcpProxy(infra.ports.amqp)
    await proxy.start()
    proxied = str(URL(infra.amqp_url).with_port(proxy.port))
    try:
        async with (
            await aio_pika.connect_robust(infra.amqp_url) as connection,
            # Tried again every second, not 5: back well within the copies' 10 s.
            await aio_pika.connect_robust(proxied, reconnect_interval=1) as publishing,
            await aio_pika.connect(infra.amqp_url) as ours,
        ):
            consumer = EventConsumer(connection, handler, topology, publishing=publishing, prefetch=10, retry_limit=10)
            await consumer.start()
            try:
                channel = await ours.channel()
                await cut(proxy, publishing)
                exchange = await channel.get_exchange(topology.exchange)
                for _ in range(EVENTS):
                    await publish(exchange, verification_requested(new_user()))
                await eventually(lambda: handler.calls >= EVENTS, within=10, what="every event handled")
                await proxy.start()

                async def retried_or_dead() -> bool:
                    return consumer.settled["retried"] >= EVENTS or bool(await waiting(channel, topology.dead_letters))

                await eventually(retried_or_dead, within=30, what="every event retried, or one dead-lettered")
            finally:
                await consumer.stop()
    finally:
        await proxy.close()

    assert await list_dead_letters(infra.amqp_url, topology, limit=10) == []
    assert consumer.settled["requeued"] == 0


async def test_a_copy_waiting_for_the_reconnect_gives_its_event_back_at_once_when_the_consumer_stops(
    infra: StackConfig, own_topology: Topology
) -> None:
    topology, handler, proxy = own_topology, Deferred(), TcpProxy(infra.ports.amqp)
    await proxy.start()
    proxied = str(URL(infra.amqp_url).with_port(proxy.port))
    try:
        async with (
            await aio_pika.connect_robust(infra.amqp_url) as connection,
            await aio_pika.connect_robust(proxied) as publishing,
            await aio_pika.connect(infra.amqp_url) as ours,
        ):
            consumer = EventConsumer(connection, handler, topology, publishing=publishing, prefetch=10, retry_limit=10)
            await consumer.start()
            channel = await ours.channel()
            await cut(proxy, publishing)  # and not back before the consumer stops
            await publish(await channel.get_exchange(topology.exchange), verification_requested(new_user()))
            await eventually(lambda: handler.calls, within=10, what="the event handled")

            stopping = time.monotonic()
            await consumer.stop()
            # Not after the copy's 10 s, or the drain's.
            assert time.monotonic() - stopping < 3.0
            assert (handler.calls, consumer.settled["requeued"]) == (1, 1)
            assert await eventually(lambda: waiting(channel, topology.queue), within=10, what="the event back") == 1
    finally:
        await proxy.close()


class ConsumingChannelClosesWhilePublishing(CopyPublisher):
    """Our publisher, except that the consumer's channel closes while the first copy is out.

    As when a delivery held after its copy went out is held past the
    broker's consumer_timeout: the broker closes the channel, and has the
    message back.
    """

    def __init__(self, connection: AbstractRobustConnection, consumer: EventConsumer) -> None:
        super().__init__(connection)
        self.consumer = consumer
        self.closed = False

    async def publish(self, copy: aio_pika.Message, *, exchange: str, routing_key: str) -> None:
        await super().publish(copy, exchange=exchange, routing_key=routing_key)
        if not self.closed:
            self.closed = True
            assert self.consumer._channel is not None
            # The robust channel opens another and consumes again, as after the broker closed it.
            await (await self.consumer._channel.get_underlay_channel()).close()


async def test_a_delivery_whose_channel_closed_while_its_copy_went_out_is_not_acked(
    infra: StackConfig, own_topology: Topology
) -> None:
    topology, handler = own_topology, Deferred(failures=1)
    async with (
        await aio_pika.connect_robust(infra.amqp_url) as connection,
        await aio_pika.connect_robust(infra.amqp_url) as publishing,
        await aio_pika.connect(infra.amqp_url) as ours,
    ):
        consumer = EventConsumer(connection, handler, topology, publishing=publishing, prefetch=10, retry_limit=10)
        consumer.copies = ConsumingChannelClosesWhilePublishing(publishing, consumer)
        await consumer.start()
        try:
            channel = await ours.channel()
            await publish(await channel.get_exchange(topology.exchange), verification_requested(new_user()))
            # Both come again, the original and its retry: at least once.
            await eventually(lambda: consumer.settled["acked"] == 2, within=20, what="the event handled twice")
        finally:
            await consumer.stop()

    # Not an ack on the closed channel, failed, then a nack that failed too.
    assert consumer.settled["channel_lost"] == 1
    assert consumer.settled["retried"] == 0
