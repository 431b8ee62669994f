"""The dead-letter queue, for people: see what is in it, and send it back.

``python -m notification_service dlq list`` shows each dead letter with why
it died, without taking it out of the queue. Its ``REASON`` is the
consumer's ``x-dead-reason`` (``malformed``, ``unsupported``, ``too_old``,
``mail_rejected``, ``retries_exhausted``, ``failures_exhausted``: see
settling.py), or else the broker's: ``delivery_limit``, handed back
unsettled too often, as by a consumer that crashes on it; ``rejected``, a
letter the consumer could not publish a copy of (or older than the copies).
``RETRIES`` and ``FAILURES`` are its counts when it died. ``dlq replay``
sends dead letters back to our own queue, not to the exchange, so that
other services bound to the same events do not receive them twice; those
of one reason only, with ``reason``. A replayed event starts with a fresh
retry and delivery budget; if it still cannot be handled, it comes back here.
Both stop at ``limit``: the ``Run`` they fill in says whether that left
letters unseen.

A replayed copy carries none of the death headers, the broker's or ours,
nor the counts, only how often it was replayed (``x-replays``). With its old
``x-death`` (died in our queue), a copy that later waits in a retry queue
would look to the broker, when that queue dead-letters it back, like a
message going round a loop of expiries, and the broker drops those.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from .headers import (
    DEAD_AT_HEADER,
    DEAD_REASON_HEADER,
    FAILURES_HEADER,
    RETRIES_HEADER,
    republishable,
)
from .topology import Topology

PREVIEW_BYTES = 60
CONNECT_TIMEOUT = 10.0
# A broker in a resource alarm blocks a connection that publishes and
# confirms nothing until the alarm clears: unbounded, a replay hangs as long.
PUBLISH_TIMEOUT = 10.0
REPLAYS_HEADER = "x-replays"
# What the broker writes when it dead-letters a message, and what the consumer does.
DEATH_HEADERS = frozenset({"x-death", "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason",
                           "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason",
                           DEAD_REASON_HEADER, DEAD_AT_HEADER})  # fmt: skip


class ReplayNotConfirmed(Exception):
    """The broker did not confirm a replayed copy in time: its letter stays in the DLQ."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    event_id: str
    routing_key: str
    reason: str
    deaths: int  # by the broker (retry queues' expiries included), since its last replay
    retries: int  # for a passing reason, since its last replay
    failures: int  # of our handler, since its last replay
    replays: int
    died_at: datetime | None
    preview: str


@dataclass(slots=True)
class Run:
    """What a listing or a replay did, filled in as it goes: a replay cut short still tells what it sent."""

    letters: list[DeadLetter] = field(default_factory=list)
    waiting: int = 0  # in the DLQ when it began
    cut_short: bool = False  # stopped at its limit, with letters it never looked at


def describe(message: AbstractIncomingMessage) -> DeadLetter:
    headers: dict[str, Any] = dict(message.headers or {})
    deaths = headers.get("x-death") or [{}]
    # The broker keeps the latest death first. x-first-death-reason would say
    # "expired" for every event that ever waited in a retry queue.
    last = deaths[0] if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) else {}
    routing_keys = last.get("routing-keys") or [message.routing_key or ""]
    # Ours first: a letter the consumer dead-lettered may carry the broker's
    # deaths too, from the retry queues it waited in.
    reason = (
        _text(headers.get(DEAD_REASON_HEADER)) or _text(headers.get("x-last-death-reason")) or _text(last.get("reason"))
    )
    died_at = headers.get(DEAD_AT_HEADER)
    return DeadLetter(
        event_id=message.message_id or "-",
        routing_key=message.type or str(routing_keys[0]),
        reason=reason or "-",
        deaths=sum(int(d.get("count", 0)) for d in deaths if isinstance(d, dict)),
        retries=_whole(headers.get(RETRIES_HEADER)),
        failures=_whole(headers.get(FAILURES_HEADER)),
        replays=_whole(headers.get(REPLAYS_HEADER)),
        died_at=died_at if isinstance(died_at, datetime) else last.get("time"),
        preview=message.body[:PREVIEW_BYTES].decode("utf-8", "replace"),
    )


async def list_dead_letters(
    amqp_url: str, topology: Topology, *, limit: int, reason: str | None = None, run: Run | None = None
) -> list[DeadLetter]:
    """Up to ``limit`` dead letters (of ``reason`` only, if given), left in the queue."""
    run = Run() if run is None else run
    connection = await aio_pika.connect(amqp_url, timeout=CONNECT_TIMEOUT)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(topology.dead_letters, ensure=True)
        run.waiting = queue.declaration_result.message_count or 0
        seen = 0
        # Fetched without ack: closing the channel puts them all back.
        while len(run.letters) < limit and (message := await queue.get(no_ack=False, fail=False)) is not None:
            seen += 1
            letter = describe(message)
            if reason is None or letter.reason == reason:
                run.letters.append(letter)
        run.cut_short = len(run.letters) >= limit and seen < run.waiting
    return run.letters


async def replay_dead_letters(
    amqp_url: str,
    topology: Topology,
    *,
    limit: int,
    event_id: str | None = None,
    reason: str | None = None,
    run: Run | None = None,
) -> list[DeadLetter]:
    """Move up to ``limit`` dead letters (only those of ``event_id``, of ``reason``, if given) back to our queue.

    A copy not confirmed within ``PUBLISH_TIMEOUT`` raises ``ReplayNotConfirmed``, its letter left in the DLQ.
    """
    run = Run() if run is None else run
    connection = await aio_pika.connect(amqp_url, timeout=CONNECT_TIMEOUT)
    async with connection:
        # A return raised, not reported as a success: a copy the broker
        # could not route (our queue is gone) must leave its letter in place.
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        queue = await channel.get_queue(topology.dead_letters, ensure=True)
        # Only what is there now: a replayed event that dies again must not
        # be picked up by this same run.
        run.waiting = queue.declaration_result.message_count or 0
        for _ in range(run.waiting):
            if len(run.letters) >= limit:
                run.cut_short = True
                break
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            letter = describe(message)
            if (event_id is not None and letter.event_id != event_id) or (
                reason is not None and letter.reason != reason
            ):
                continue  # left unacked: back in the queue when the channel closes
            copy = _fresh_copy(message)
            try:
                await channel.default_exchange.publish(
                    copy, routing_key=topology.queue, mandatory=True, timeout=PUBLISH_TIMEOUT
                )
            except TimeoutError:
                raise ReplayNotConfirmed(f"not confirmed within {PUBLISH_TIMEOUT:g} s") from None
            await message.ack()
            run.letters.append(letter)
    return run.letters


def _fresh_copy(message: AbstractIncomingMessage) -> aio_pika.Message:
    dropped = DEATH_HEADERS | {RETRIES_HEADER, FAILURES_HEADER}  # and the delivery count: republishable
    headers = {k: v for k, v in (message.headers or {}).items() if k not in dropped}
    headers[REPLAYS_HEADER] = _whole((message.headers or {}).get(REPLAYS_HEADER)) + 1
    return republishable(message, headers)


def _text(value: Any) -> str:
    """A header's text (AMQP strings may come as bytes), or "" where there is none."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) else ""


def _whole(value: Any) -> int:
    """A count from a header, or 0 where there is none (or something else is)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def format_table(letters: list[DeadLetter]) -> str:
    lines = [
        f"{'EVENT ID':<36}  {'TYPE':<16}  {'REASON':<18}  {'DEATHS':>6}  {'RETRIES':>7}  {'FAILURES':>8}"
        f"  {'REPLAYS':>7}  {'DIED AT':<25}  BODY"
    ]
    for d in letters:
        died = d.died_at.isoformat() if d.died_at else "-"
        lines.append(
            f"{d.event_id:<36}  {d.routing_key:<16}  {d.reason:<18}  {d.deaths:>6}  {d.retries:>7}  {d.failures:>8}"
            f"  {d.replays:>7}  {died:<25}  {d.preview!r}"
        )
    return "\n".join(lines)
