"""The counts a message carries in its headers, and the copies that carry them on.

``x-retries`` and ``x-failures`` are ours: the consumer's budgets for
transient failures and for bugs, kept on the copies it republishes.
``x-delivery-count`` is the broker's, which a copy must not take along.

Failures are counted by us, not by the broker: a quorum queue on RabbitMQ
3.x counts every return of a delivery against its delivery-limit, a channel
closing with the message in hand (a restart, a reconnect, a drain that ran
out of time) as much as a nack. Measured on 3.10.8: ``x-delivery-count``
1, 2 and 3 after three channel closes, and the message dead-lettered at the
limit without ever failing. RabbitMQ 4.0 stopped counting those returns.
So the queue's delivery-limit (definitions.json) is only a backstop, sized
for restarts: it dead-letters what keeps coming back unsettled, a message
that crashes the process before it can be settled. A count header that
holds no count (``count``) is no copy of ours: the consumer dead-letters
the message when it reads the count.

``x-dead-reason`` and ``x-dead-at`` are on the copy the consumer dead-letters:
why (a stable code) and when. The broker's own dead-lettering records only
``rejected`` for every message refused, whatever the cause.
"""

from __future__ import annotations

from datetime import UTC, datetime

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, HeadersType

from .failures import MalformedCount

RETRIES_HEADER = "x-retries"
FAILURES_HEADER = "x-failures"
# Set by quorum queues on every delivery; a republished copy must not carry
# the old count, since the broker counts afresh.
DELIVERY_COUNT_HEADER = "x-delivery-count"
DEAD_REASON_HEADER = "x-dead-reason"
DEAD_AT_HEADER = "x-dead-at"


def republishable(message: AbstractIncomingMessage, headers: HeadersType) -> aio_pika.Message:
    """A persistent copy of ``message`` with ``headers``, but never the broker's delivery count, to publish again."""
    return aio_pika.Message(
        message.body,
        headers={k: v for k, v in headers.items() if k != DELIVERY_COUNT_HEADER},
        content_type=message.content_type,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        type=message.type,
        timestamp=message.timestamp,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


def counted_copy(message: AbstractIncomingMessage, header: str, count: int) -> aio_pika.Message:
    return republishable(message, {**(message.headers or {}), header: count})


def dead_copy(message: AbstractIncomingMessage, reason: str) -> aio_pika.Message:
    """The copy for the dead-letter exchange, saying why and when, with the counts as they were."""
    return republishable(
        message, {**(message.headers or {}), DEAD_REASON_HEADER: reason, DEAD_AT_HEADER: datetime.now(UTC)}
    )


def count(message: AbstractIncomingMessage, header: str) -> int:
    """A count kept in a header; 0 when it is absent.

    A whole number, 0 or more: an int, or its digits in a string (as the
    management UI publishes headers). Anything else raises
    ``MalformedCount``, never read as 0 nor taken as it is: a count read
    as 0 restarts the event's budget, and a negative one lets it run for
    ever (a bug's redelivery at once, x-failures -100000: a hot loop).
    """
    value = (message.headers or {}).get(header)
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    raise MalformedCount(f"header {header} holds {value!r:.40}, not a count")
