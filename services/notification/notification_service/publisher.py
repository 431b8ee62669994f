"""The consumer's copies (retries, redeliveries, dead letters), published on a connection of their own.

Not on the connection the consumer takes its messages on: during a resource
alarm (memory above its watermark, free disk below ``disk_free_limit``)
RabbitMQ blocks each connection that publishes by no longer reading from it,
acks included. On one connection, one copy for a retry queue stopped the
whole consumer until the alarm cleared: its prefetched deliveries unacked,
nothing new delivered, and the nack after the copy's timeout never read.
A connection that only consumes is never blocked; this one may be, alone.

While it is blocked, a delivery that needs a copy holds its message,
unacked, and the other deliveries go on. Held until the alarm clears, it
then publishes its copy and acks, as it would have. Nothing else is safe:

- nacked with requeue, it would come straight back, fail again for the same
  passing reason, and spend its delivery-limit on the alarm (20 returns, then
  dead-lettered), with a copy left in the socket at each turn;
- acked, it would be lost with the process: its copy is not in the broker.

A held delivery keeps its place in the prefetch window. If every place
holds one (every event failing, say the SMTP server is down as well), the
consumer takes no more until the alarm clears, and the messages wait, safe,
in the broker, as they would have in a retry queue. Held past the broker's
consumer_timeout (30 minutes by default), they go back with their channel,
each a delivery spent, and come again: the consumer settles nothing for a
delivery whose channel has closed.

The broker says a connection is blocked only once it has published during
the alarm: the first copy goes out, and its confirm comes when the alarm
clears. So the confirm's timeout counts only time the connection is not
blocked. Given up on sooner, the delivery would be given back while its
copy still arrived later, the event twice.

While this connection reconnects (closed by an operator, or back later
than the consuming one after a broker restart), a copy waits for it as
well, within its timeout, rather than fail at once. The copy's delivery,
given back, would come straight back and fail again, its delivery-limit
spent in a second.

A hold, and a wait for the reconnect, end when the consumer stops:
``PublishingStopped``, and the delivery gives its message back, for the
next instance. A copy already sent may still arrive when the alarm
clears: the event twice, which its email's claim keeps to one email.
"""

from __future__ import annotations

import asyncio
import time

import aio_pika
import structlog
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection

from mesh_common.amqp import UNBLOCKED_CHECK_INTERVAL, blocked, wait_unblocked
from mesh_common.app import wait_event

log = structlog.get_logger()

# How long a copy's confirm may take while the connection is not blocked.
PUBLISH_TIMEOUT = 10.0
# How often a wait for the connection's reconnect looks again at the channel.
READY_CHECK_INTERVAL = 0.1


class PublishingStopped(Exception):
    """The consumer is stopping while a copy waits for the broker to unblock its connection."""


class CopyPublisher:
    def __init__(self, connection: AbstractRobustConnection, *, timeout: float = PUBLISH_TIMEOUT) -> None:
        self._connection = connection
        self._timeout = timeout
        self._channel: AbstractRobustChannel | None = None
        self._stopping = asyncio.Event()
        self.held = 0  # copies that waited for the broker to unblock the connection

    @property
    def blocked(self) -> bool:
        return blocked(self._connection)

    async def open(self) -> None:
        # Publisher confirms, to know a copy is safe before the original is
        # acked. Returns raised too: with aio-pika's default, a copy the
        # broker could not route (its queue is gone) is returned and
        # reported as a success.
        self._channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)

    def stop(self) -> None:
        """End the holds: each raises ``PublishingStopped``."""
        self._stopping.set()

    async def close(self) -> None:
        # Not while blocked: the broker would not read the close. The
        # connection's own close, bounded, ends the channel with it.
        if self._channel is not None and not self.blocked:
            await self._channel.close()

    async def hold(self) -> bool:
        """Wait while the connection is blocked; whether it was."""
        if not self.blocked:
            return False
        self.held += 1
        log.warning("event_held", reason="amqp_blocked")
        await self._until_unblocked()
        return True

    async def publish(self, copy: aio_pika.Message, *, exchange: str, routing_key: str) -> None:
        """Publish ``copy`` and wait for its confirm, held while the connection is blocked or reconnecting."""
        assert self._channel is not None
        deadline = time.monotonic() + self._timeout
        await self._until_ready(self._channel, deadline)
        if await self.hold():
            deadline = time.monotonic() + self._timeout
        target = (
            self._channel.default_exchange if not exchange else await self._channel.get_exchange(exchange, ensure=False)
        )
        publishing = asyncio.ensure_future(target.publish(copy, routing_key=routing_key, mandatory=True))
        try:
            # Looked at every second: the broker blocks the connection just
            # after it has read the copy, and says so.
            while not (await asyncio.wait({publishing}, timeout=UNBLOCKED_CHECK_INTERVAL))[0]:
                if self.blocked:
                    self.held += 1
                    log.warning("event_held", reason="amqp_blocked_after_publishing")
                    await self._until_unblocked()
                    deadline = time.monotonic() + self._timeout
                elif time.monotonic() > deadline:
                    raise TimeoutError(f"the copy was not confirmed within {self._timeout} s")
            publishing.result()
        finally:
            publishing.cancel()

    async def _until_ready(self, channel: AbstractRobustChannel, deadline: float) -> None:
        """Wait, until ``deadline``, while the connection reconnects and the channel is restored.

        aio-pika's publish does not wait for a reconnect: on a channel not
        yet restored it raises at once. A copy failing at once gave its
        delivery back, which came straight back, failed again, and spent its
        delivery-limit within a second, dead-lettered for a reconnect of this
        connection alone (an operator closing it, the two connections
        recovering out of step after a broker restart).
        """
        while channel.is_closed:
            if self._stopping.is_set():
                raise PublishingStopped("the consumer is stopping, and the connection for its copies is down")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"the connection for copies was not back within {self._timeout} s")
            # Polled, not channel.ready(): that may answer while the channel
            # is still closed (its close callbacks not yet run), and spin.
            await wait_event(self._stopping, min(remaining, READY_CHECK_INTERVAL))

    async def _until_unblocked(self) -> None:
        waits = [asyncio.ensure_future(wait_unblocked(self._connection)), asyncio.ensure_future(self._stopping.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        if self._stopping.is_set():
            raise PublishingStopped("the consumer is stopping, and the broker still blocks its copies")
