"""How a delivery is settled: every message ends acked, retried later, or dead-lettered.

What happens to a message depends on how handling ended:

=====================  ==================================================
handled                ack
``TemporaryFailure``   republished to a retry queue (1 s, 5 s, then 30 s),
                       which returns it to our queue when its TTL expires;
                       then ack. Counted in ``x-retries``, apart from
                       bugs: given up on only after ``retry_limit``
                       retries (about a day).
``UnprocessableEvent`` dead-lettered now.
``ShuttingDown``       nack with requeue: given back, untouched, for the
                       next instance (see ``EventConsumer.stop``).
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
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import Protocol

import aio_pika
import structlog
from aio_pika.abc import AbstractIncomingMessage

from mesh_common.events import Event

from .events import parse
from .failures import MalformedCount, ShuttingDown, TemporaryFailure, UnprocessableEvent
from .headers import FAILURES_HEADER, RETRIES_HEADER, count, counted_copy, dead_copy
from .notifier import Outcome
from .publisher import CopyPublisher, PublishingStopped
from .topology import Topology

log = structlog.get_logger()

# Failures of the handler itself (bugs) before an event is dead-lettered.
FAILURE_LIMIT = 5
# Our reasons for a dead letter, besides an UnprocessableEvent's own (failures.py).
RETRIES_EXHAUSTED = "retries_exhausted"  # still failing for a passing reason after retry_limit retries
FAILURES_EXHAUSTED = "failures_exhausted"  # our handler failed on it (a bug) more than failure_limit times
# Closing a channel waits for the broker's close-ok; a broker that does not
# answer must not hold the delivery's task.
CHANNEL_CLOSE_TIMEOUT = 5.0


class Handler(Protocol):
    async def handle(self, event: Event) -> Outcome | None: ...


class Settling:
    """EventConsumer's settling of each delivery (consumer.py, whose ``__init__`` sets these)."""

    settled: Counter[str]
    copies: CopyPublisher
    _handler: Handler
    _topology: Topology
    _retry_limit: int
    _failure_limit: int

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
