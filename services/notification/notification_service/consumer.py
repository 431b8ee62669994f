"""The event consumer: each delivery handled in a task of ours, then settled (settling.py).

Each delivery is handled in a task of ours (up to ``prefetch`` at a time),
with manual acknowledgement and the message's correlation id bound as the
log ``request_id``; not in aiormq's, which it cancels when their channel
closes (a send cancelled in DATA went out again, uncounted, once its claim's
lease ran out). Only the end of a shutdown's drain cancels ours. How
handling ended decides whether its message is acked, retried later, given
back or dead-lettered (settling.py).

The connection is ``connect_robust``: after a broker restart it restores
this channel, its QoS and the consumer by itself. Messages in flight then
are redelivered while their first deliveries go on: the email's claim keeps
the two from both sending it, and a delivery whose channel is gone settles
nothing (``channel_lost``): the broker has its message back.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustChannel, AbstractRobustConnection

from .publisher import CopyPublisher
from .settling import FAILURE_LIMIT, Handler, Settling
from .topology import ROUTING_KEYS, Topology, existing_exchange, existing_queue

log = structlog.get_logger()

# How long deliveries cancelled at the end of a drain get to unwind.
STUCK_CANCEL_TIMEOUT = 5.0


class EventConsumer(Settling):
    """Consumes on ``connection``; publishes its copies on ``publishing``, another (publisher.py)."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        handler: Handler,
        topology: Topology,
        *,
        publishing: AbstractRobustConnection,
        prefetch: int,
        retry_limit: int,
        failure_limit: int = FAILURE_LIMIT,
    ) -> None:
        self._connection = connection
        self._handler = handler
        self._topology = topology
        self.copies = CopyPublisher(publishing)
        self._prefetch = prefetch
        self._retry_limit = retry_limit
        self._failure_limit = failure_limit
        self._channel: AbstractRobustChannel | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        # How deliveries ended: acked, retried, failed, dead_lettered, requeued,
        # channel_lost (the channel closed under it: redelivered).
        self.settled: Counter[str] = Counter()

    async def start(self) -> None:
        self._channel = channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=self._prefetch)
        # Passive declarations: the topology comes from definitions.json, and
        # a missing queue should stop us at start-up, not on the first retry.
        # The retry queues are checked once, not at every channel recovery: a
        # retry queue lost later must not keep the consumer from coming back.
        for name in self._topology.retry_queues:
            await existing_queue(channel, name, robust=False)
        await existing_exchange(channel, self._topology.dead_letter_exchange)
        await self.copies.open()
        self._queue = queue = await existing_queue(channel, self._topology.queue)
        # The bindings are ours to make too (idempotent): a broker that kept
        # its definitions from before a new event was bound (a container not
        # recreated) would park that event as unrouted, and no one would know.
        await existing_exchange(channel, self._topology.exchange)
        for key in ROUTING_KEYS:
            await queue.bind(self._topology.exchange, key)
        self._consumer_tag = await self._queue.consume(self._on_message)
        log.info("consumer_started", queue=self._topology.queue, prefetch=self._prefetch)

    async def stop(self, *, drain_timeout: float = 10.0) -> None:
        """Stop taking messages, let those in hand finish, then close the channels.

        Every step is bounded: a broker that does not answer must not keep
        the process from exiting. Whatever is not acked by then is redelivered.
        A delivery that has not claimed its email when the notifier stops
        (workers.py stops it first) gives its message back: ``ShuttingDown``;
        so does one held while the broker blocks its copy (publisher.py).
        """
        self.copies.stop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout

        def in_time() -> None:
            # On the clock as well as cut: on Python 3.11 aiormq can swallow
            # the cut, coming as a step below is answered, into that answer or
            # its error, and no other cut would come.
            if loop.time() >= deadline:
                raise TimeoutError

        try:
            async with asyncio.timeout_at(deadline):
                if self._queue is not None and self._consumer_tag is not None:
                    try:
                        await self._queue.cancel(self._consumer_tag)
                    except Exception as exc:
                        # A channel or connection gone wrong: the deliveries
                        # in hand must still end before what they use closes.
                        log.warning("consumer_cancel_failed", error=type(exc).__name__, detail=str(exc))
                # Until none is left: one may start after a wait began (a
                # delivery dispatched before the cancel took effect).
                while self._in_flight:
                    in_time()
                    await asyncio.wait(set(self._in_flight), timeout=deadline - loop.time())
                if self._channel is not None:
                    in_time()
                    await self._channel.close()
                in_time()
                await self.copies.close()
        except TimeoutError:
            log.warning("consumer_stop_timed_out", in_flight=len(self._in_flight))
            # Not left running past the resources they use, which close next:
            # cancelled, they leave their messages unacked, to be redelivered,
            # and a send cut short is counted or released (notifier.py).
            stuck = set(self._in_flight)
            for task in stuck:
                task.cancel()
            if stuck:
                await asyncio.wait(stuck, timeout=STUCK_CANCEL_TIMEOUT)
        log.info("consumer_stopped", queue=self._topology.queue)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # Handed to a task of ours, which aiormq does not cancel with the channel (module docstring).
        task = asyncio.create_task(self._handle(message), name=f"delivery-{message.message_id}")
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        with structlog.contextvars.bound_contextvars(
            request_id=message.correlation_id or message.message_id,
            event_id=message.message_id,
            event_type=message.type,
        ):
            try:
                await self._process(message)
            except Exception as exc:
                log.warning("event_settle_failed", error=type(exc).__name__, detail=str(exc))
                await self._give_back(message)
