"""The broker objects this service uses, by name.

They are declared in rabbitmq/definitions.json, which the broker loads at
boot, together with the policies that give them their behaviour: this
service only checks that they exist (a passive declare), so the topology has
one source of truth. Its queue's bindings it also makes at start, which
changes nothing on a broker that loaded the definitions, and on one that
loaded older ones (a new event type) keeps the new events from going
unrouted. ``tests/test_notification_definitions.py`` keeps the two in step.

    todo-mesh.events --ROUTING_KEYS--> notifications.events
        dead: a copy with x-dead-reason, published to notifications.dlx --> notifications.dead
        handed back unsettled > delivery-limit times --> notifications.dlx --> notifications.dead
        a bug met: republished to notifications.events, counted in x-failures
        transient failure: republished to notifications.retry.<delay>,
                           which dead-letters back into notifications.events when the TTL expires
"""

from __future__ import annotations

from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractQueue, AbstractRobustChannel

from mesh_common.events import EVENTS_EXCHANGE

# What our queue is bound to on the events exchange. user.registered sends
# nothing any more, and stays bound: one still queued, or from an older
# publisher, is acked rather than left unrouted.
ROUTING_KEYS = (
    "user.email_verification_requested",
    "user.password_changed",
    "user.email_changed",
    "user.registered",
    "todo.*",
)
# One queue per delay, each with a fixed x-message-ttl: a single queue with
# per-message TTLs would hold a short delay behind a long one, since a queue
# only expires the message at its head.
RETRY_DELAYS = (("1s", 1.0), ("5s", 5.0), ("30s", 30.0))


@dataclass(frozen=True, slots=True)
class Topology:
    exchange: str = EVENTS_EXCHANGE
    namespace: str = "notifications"

    @property
    def queue(self) -> str:
        return f"{self.namespace}.events"

    @property
    def dead_letters(self) -> str:
        return f"{self.namespace}.dead"

    @property
    def dead_letter_exchange(self) -> str:
        """Where our queue's policy dead-letters, and the consumer publishes its dead letters: to ``dead_letters``."""
        return f"{self.namespace}.dlx"

    @property
    def retry_queues(self) -> tuple[str, ...]:
        return tuple(f"{self.namespace}.retry.{suffix}" for suffix, _ in RETRY_DELAYS)

    def retry_tier(self, attempt: int) -> tuple[str, float]:
        """The retry queue and its delay for the ``attempt``-th retry (from 1): exponential, then flat."""
        index = min(max(attempt, 1), len(RETRY_DELAYS)) - 1
        return self.retry_queues[index], RETRY_DELAYS[index][1]


class TopologyMissing(RuntimeError):
    """A queue or exchange we need was not declared on the broker."""


async def existing_queue(channel: AbstractRobustChannel, name: str, *, robust: bool = True) -> AbstractQueue:
    """The queue ``name``, passively declared: one missing is ``TopologyMissing``."""
    try:
        return await channel.declare_queue(name, passive=True, robust=robust)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        raise TopologyMissing(f"queue {name!r} does not exist: load rabbitmq/definitions.json") from None


async def existing_exchange(channel: AbstractRobustChannel, name: str) -> AbstractExchange:
    """The exchange ``name``, passively declared: one missing is ``TopologyMissing`` (and closes ``channel``)."""
    try:
        return await channel.declare_exchange(name, passive=True, robust=False)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        raise TopologyMissing(f"exchange {name!r} does not exist: load rabbitmq/definitions.json") from None
