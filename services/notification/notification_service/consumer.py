"""The event consumer: every message ends acked, retried later, or dead-lettered.

Each delivery is handled in a task of ours (up to ``prefetch`` at a time),
with manual acknowledgement and the message's correlation id bound as the
log ``request_id``; not in aiormq's, which it cancels when their channel
closes (a send cancelled in DATA went out again, uncounted, once its claim's
lease ran out). Only the end of a shutdown's drain cancels ours. What
happens to a message depends on how handling ended:

=====================  ==================================================
handled                ack
``TemporaryFailure``   republished to a retry queue (1 s, 5 s, then 30 s),
                       which returns it to our queue when its TTL expires;
                       then ack. Counted in ``x-retries``, apart from
                       bugs: given up on only after ``retry_limit``
                       retries (about a day).
``UnprocessableEvent`` dead-lettered now.
``ShuttingDown``       nack with requeue: given back, untouched, for the
                       next instance (see ``stop``).
anything else (a bug)  republished to our own queue at once, with its
                       failures counted in ``x-failures``; then ack.
                       Dead-lettered after ``failure_limit`` (5).
=====================  ==================================================

Dead-lettered: a copy saying why (``x-dead-reason``: the failure's
``reason``, ``retries_exhausted`` or ``failures_exhausted``) is published to
the dead-letter exchange, then the message acked; a reject has the broker
record ``rejected`` for every cause alike. If the copy cannot be published
(returned, nacked, not confirmed in time), the message is rejected after
all: dead-lettered by the broker, without its reason. A copy for a retry
queue that cannot be published gives its message back (``_give_back``).
Every copy goes out on a connection of its own, which a resource alarm may
block while the consumer goes on (publisher.py). Failures are counted by
us, not by the broker (headers.py).

The connection is ``connect_robust``: after a broker restart it restores
this channel, its QoS and the consumer by itself. Messages in flight then
are redelivered while their first deliveries go on: the email's claim keeps
the two from both sending it, and a delivery whose channel is gone settles
nothing (``channel_lost``): the broker has its message back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import Protocol

import aio_pika
import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustChannel, AbstractRobustConnection

from mesh_common.events import Event

from .events import parse
from .failures import MalformedCount, ShuttingDown, TemporaryFailure, UnprocessableEvent
from .headers import FAILURES_HEADER, RETRIES_HEADER, count, counted_copy, dead_copy
from .notifier import Outcome
from .publisher import CopyPublisher, PublishingStopped
from .topology import Topology, existing_exchange, existing_queue

log = structlog.get_logger()

# Failures of the handler itself (bugs) before an event is dead-lettered.
FAILURE_LIMIT = 5
# Our reasons for a dead letter, besides an UnprocessableEvent's own (failures.py).
RETRIES_EXHAUSTED = "retries_exhausted"  # still failing for a passing reason after retry_limit retries
FAILURES_EXHAUSTED = "failures_exhausted"  # our handler failed on it (a bug) more than failure_limit times
# Closing a channel waits for the broker's close-ok; a broker that does not
# answer must not hold the delivery's task.
CHANNEL_CLOSE_TIMEOUT = 5.0
# How long deliveries cancelled at the end of a drain get to unwind.
STUCK_CANCEL_TIMEOUT = 5.0


class Handler(Protocol):
    async def handle(self, event: Event) -> Outcome | None: ...


class EventConsumer:
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
        self._queue = await existing_queue(channel, self._topology.queue)
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
        try:
            async with asyncio.timeout(drain_timeout):
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
                    await asyncio.wait(set(self._in_flight))
                if self._channel is not None:
                    await self._channel.close()
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

    async def _give_back(self, message: AbstractIncomingMessage) -> None:
        """Hand a message we could not settle back to the broker, to be delivered again.

        Left unacked on a live channel, it would sit there until the broker's
        consumer_timeout. A nack with requeue first (it spends one of the
        message's delivery-limit). If that fails too, closing the channel it
        came on returns it, with whatever else is unacked there (their
        deliveries go on, and settle nothing: ``_channel_lost``), and the
        robust connection opens a new channel and consumes again. If the
        channel is closed already, the broker has the message back.
        """
        try:
            await self._requeue(message)
            return
        except Exception as exc:
            log.warning("event_requeue_failed", error=type(exc).__name__)
        try:
            channel = message.channel
        except aio_pika.exceptions.ChannelInvalidStateError:
            return
        log.warning("consumer_channel_reset", reason="requeue_failed")
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CHANNEL_CLOSE_TIMEOUT):
                await channel.close()

    async def _requeue(self, message: AbstractIncomingMessage) -> None:
        await message.nack(requeue=True)
        self.settled["requeued"] += 1

    async def _process(self, message: AbstractIncomingMessage) -> None:
        failure: Exception | None = None
        try:
            await self._handler.handle(parse(message.body))
        except Exception as exc:
            failure = exc
        if self._channel_lost(message):
            return
        if failure is None:
            await message.ack()
            self.settled["acked"] += 1
        elif isinstance(failure, UnprocessableEvent):
            await self._dead_letter(message, failure.reason, failure)
        elif isinstance(failure, ShuttingDown):
            log.info("event_given_back", reason=str(failure))
            await self._give_back(message)
        elif isinstance(failure, TemporaryFailure):
            await self._retry_later(message, failure)
        else:
            await self._deliver_again(message, failure)

    def _channel_lost(self, message: AbstractIncomingMessage) -> bool:
        """Whether the channel the message came on has closed since: the broker has it back, to redeliver."""
        try:
            message.channel  # noqa: B018 - raises once the channel has closed
        except aio_pika.exceptions.ChannelInvalidStateError:
            log.info("event_channel_lost")
            self.settled["channel_lost"] += 1
            return True
        return False

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: str, exc: Exception) -> None:
        log.error("event_dead_lettered", reason=reason, error=type(exc).__name__, detail=str(exc))
        exchange, routing_key = self._topology.dead_letter_exchange, message.routing_key or ""
        try:
            if not await self._publish(message, dead_copy(message, reason), exchange, routing_key):
                return
        except PublishingStopped:
            raise
        except Exception as failed:
            # Dead-lettered by the broker instead: listed as "rejected", but
            # in the DLQ. A copy that arrives after all makes the letter twice.
            log.warning("event_dead_letter_copy_failed", error=type(failed).__name__, detail=str(failed))
            await message.reject(requeue=False)
        else:
            await message.ack()
        self.settled["dead_lettered"] += 1

    async def _retry_later(self, message: AbstractIncomingMessage, exc: Exception) -> None:
        attempt = await self._counted(message, RETRIES_HEADER, exc)
        if attempt is None:
            return
        if attempt > self._retry_limit:
            await self._dead_letter(message, RETRIES_EXHAUSTED, exc)
            return
        queue, delay = self._topology.retry_tier(attempt)
        if not await self._publish(message, counted_copy(message, RETRIES_HEADER, attempt), "", queue):
            return
        await message.ack()
        self.settled["retried"] += 1
        log.warning("event_retry_scheduled", reason=type(exc).__name__, detail=str(exc), attempt=attempt, delay=delay)

    async def _deliver_again(self, message: AbstractIncomingMessage, exc: Exception) -> None:
        # A copy, not a nack with requeue: the broker's count would also
        # take in every restart the message was in hand for (module docstring).
        failures = await self._counted(message, FAILURES_HEADER, exc)
        if failures is None:
            return
        log.error("event_failed", failures=failures, exc_info=exc)
        if failures > self._failure_limit:
            await self._dead_letter(message, FAILURES_EXHAUSTED, exc)
            return
        if not await self._publish(message, counted_copy(message, FAILURES_HEADER, failures), "", self._topology.queue):
            return
        await message.ack()
        self.settled["failed"] += 1

    async def _counted(self, message: AbstractIncomingMessage, header: str, exc: Exception) -> int | None:
        """The count in ``header`` with this failure, or None, the message dead-lettered, if it holds no count.

        Dead-lettered at once: raised on, the message came straight back, until the broker's delivery-limit.
        """
        try:
            return count(message, header) + 1
        except MalformedCount as malformed:
            log.error("event_failed", exc_info=exc)
            await self._dead_letter(message, malformed.reason, malformed)
            return None

    async def _publish(
        self, message: AbstractIncomingMessage, copy: aio_pika.Message, exchange: str, routing_key: str
    ) -> bool:
        """Publish ``copy``; False, ``message`` not to be settled, if its channel closed while it was held
        (past the broker's consumer_timeout): the broker has it back, to deliver again."""
        if await self.copies.hold() and self._channel_lost(message):
            return False
        await self.copies.publish(copy, exchange=exchange, routing_key=routing_key)
        # Held after the copy went out, the channel may have closed since:
        # an ack would fail. The copy and the original both come again (a
        # dead letter twice, an event retried twice), at least once still.
        return not self._channel_lost(message)
