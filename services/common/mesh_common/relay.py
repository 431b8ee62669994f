"""The outbox relay: from committed rows to RabbitMQ, at least once.

It claims a batch with ``FOR UPDATE SKIP LOCKED`` (so several instances never
publish the same row in the normal case), publishes each row persistently and
waits for the broker's confirm, then marks the batch sent in the same
transaction (or deletes the rows not to be kept: see outbox.py). A crash
between confirm and commit publishes the batch again: consumers are
idempotent by event id, so a duplicate is harmless. It wakes
when this process commits a change with events (``OUTBOX_COMMITTED``, see
outbox.py), and polls every second for the rest: events committed by an
instance that stopped before it published them.

Or froze holding a claim: paused, stopped by SIGSTOP, or cut off from
PostgreSQL. The server sees a session idle in its transaction, whose locks
keep the rows from every other relay until TCP's keepalive gives up (about
two hours at Linux's defaults; a paused process's kernel answers it anyway).
So each claim has the server end its session once idle in the transaction
for ``claim_limit``, twice the batch's own bound: 30 s by default.

A confirm alone does not mean that a queue has the event: the broker confirms
a message it could route nowhere, and drops it. So events are published
``mandatory`` on a channel that raises on a return. Where no queue is bound
for an event's routing key, the events exchange's alternate exchange (a
policy in rabbitmq/definitions.json) routes it to ``todo-mesh.unrouted``,
where it waits, visibly, for someone to look; the broker confirms it and the
row is marked sent. Only a broker without our definitions returns an event:
then the returned events are not marked (the rest of the batch is), the relay
logs ``outbox_events_unroutable``, and the events wait in the outbox until the
topology is loaded. Each is held back for ``returned_hold`` (its row's
``held_until``) before it is tried again: else, the oldest rows, they would
head every claim, and a batch of them would stop every event behind them.
Nothing is dropped silently either way.

During a resource alarm (memory or disk low) the broker reads nothing more
from a connection that publishes, not even a channel's close, until the
alarm clears. The batch that meets it fails by its bound; then the relay
claims nothing, and waits for the alarm's end or a stop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Set as AbstractSet
from typing import Any

import aio_pika
import aiopg
import psycopg2
import structlog
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection

from .amqp import AMQP, blocked, wait_unblocked
from .app import CleanupCtx, until_set, wait_event, worker_ctx
from .db import DB, STATEMENT_TIMEOUT
from .events import EVENTS_EXCHANGE
from .outbox import OUTBOX_COMMITTED
from .transactions import CommitOutcomeUnknown, server_cancels_as_errors, transaction

log = structlog.get_logger()
CLAIM = (
    "SELECT id, routing_key, payload, correlation_id FROM outbox"
    " WHERE published_at IS NULL AND coalesce(held_until, '-infinity') <= now()"
    " ORDER BY coalesce(held_until, '-infinity'), created_at LIMIT %s FOR UPDATE SKIP LOCKED"
)
HOLD = "UPDATE outbox SET held_until = now() + make_interval(secs => %(hold)s) WHERE id = ANY(%(returned)s::uuid[])"
# The confirmed rows marked sent, or deleted if not to be kept (enqueue's
# ``keep``), in one statement: a row that carries a secret never outlives
# its publishing's transaction.
SETTLE = (
    "WITH gone AS (DELETE FROM outbox WHERE id = ANY(%(sent)s::uuid[]) AND NOT keep_published)"
    " UPDATE outbox SET published_at = now() WHERE id = ANY(%(sent)s::uuid[]) AND keep_published"
)
CONFIRM_TIMEOUT = 5.0
# How long an event the broker returned waits before it is tried again:
# until someone loads the topology, which takes minutes at best.
RETURNED_HOLD = 30.0
# What an outage of the broker or the database raises, and goes by itself.
# Anything else (a permission, a missing column, a bug) needs someone, and
# is logged as an error with its traceback rather than as one more retry.
OUTAGES = (
    ConnectionError,
    TimeoutError,
    aio_pika.exceptions.AMQPError,
    psycopg2.OperationalError,
    psycopg2.InterfaceError,
    # A COMMIT's answer lost, and the database unreachable to ask: rows not
    # marked are published again, which consumers drop.
    CommitOutcomeUnknown,
)


def batch_bound(confirm_timeout: float) -> float:
    """The longest a batch waits on the broker between its claim and its marking.

    Its publishes get twice the confirm timeout, then those still out are
    given one more to settle (see ``publish_batch``).
    """
    return 3 * confirm_timeout


def _outcome(publish: asyncio.Future[Any], late: AbstractSet[asyncio.Future[Any]]) -> Any:
    """What one publish came to: its result, or the exception it ended with."""
    if publish in late:
        if publish.done() and not publish.cancelled():
            publish.exception()  # read, or asyncio logs it as never retrieved
        return TimeoutError("no confirm within the batch's bound")
    if publish.cancelled():  # by aiormq, as a channel closed: see publish_batch
        return asyncio.CancelledError()
    return publish.exception() or publish.result()


class OutboxRelay:
    def __init__(
        self,
        pool: aiopg.Pool,
        connection: AbstractRobustConnection,
        *,
        batch_size: int = 100,
        poll_interval: float = 1.0,
        confirm_timeout: float = CONFIRM_TIMEOUT,
        returned_hold: float = RETURNED_HOLD,
        committed: asyncio.Event | None = None,
    ) -> None:
        self._pool = pool
        self._connection = connection
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._confirm_timeout = confirm_timeout
        self._returned_hold = returned_hold
        # Idle this long in a claim's transaction, the session is ended by the
        # server, and its locks with it. Twice the batch's bound, which is
        # kept by this process's clock and loop, and a busy loop stretches:
        # a working batch cut off fails, and its confirmed rows go out again.
        self.claim_limit = 2 * batch_bound(confirm_timeout)
        # Set by ``publishing`` when a change with events commits, and by stop().
        self._wake = committed if committed is not None else asyncio.Event()
        self._stopped = asyncio.Event()
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None

    async def _get_exchange(self) -> AbstractExchange | None:
        """The exchange to publish to, once the broker takes what we send; None if stopped first."""
        # While the broker is away there is nothing to do but wait: the rows
        # stay in the outbox, and the robust connection reconnects. So too
        # while it blocks this connection in a resource alarm (it reads
        # nothing from a connection that published until the alarm clears):
        # a channel opened, or a batch claimed, would only wait out its
        # timeout. A stop ends the wait, with nothing in hand to finish:
        # held here, a shutdown would sit out the grace meant for a batch.
        if not await until_set(self._stopped, self._usable()):
            return None
        # Bounded all the same, and ended by a stop: blocked at any moment,
        # the broker would never answer the open.
        if self._exchange is None and not await until_set(self._stopped, self._open(), within=self._confirm_timeout):
            if self._stopped.is_set():
                return None
            raise TimeoutError("the broker opened no channel within the confirm timeout")
        return self._exchange

    async def _usable(self) -> None:
        await self._connection.ready()
        if blocked(self._connection):
            # Said once a wait: the outbox grows meanwhile, and this is why.
            log.warning("outbox_relay_blocked", why="the broker's resource alarm (memory or disk low)")
            await wait_unblocked(self._connection)
            log.info("outbox_relay_unblocked")

    async def _open(self) -> None:
        self._channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        # Kept from here on, for _drop_channel to close should the declare fail.
        self._exchange = await self._channel.declare_exchange(
            EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )

    async def _drop_channel(self) -> None:
        # A failed publish may leave the channel unusable; a new one is opened
        # for the next batch, and this one is closed rather than leaked. Not
        # waited for past a stop or the confirm timeout: a broker that blocks
        # the connection answers no close until its alarm clears.
        channel, self._channel, self._exchange = self._channel, None, None
        if channel is not None:
            with contextlib.suppress(Exception):
                await until_set(self._stopped, channel.close(), within=self._confirm_timeout)

    async def publish_batch(self) -> int:
        """Publish one batch of unsent rows; returns how many were sent."""
        # The channel first: no rows are locked, and no transaction is held
        # open, while the broker cannot be reached.
        if (exchange := await self._get_exchange()) is None:
            return 0
        async with transaction(self._pool) as cur:
            # Before the claim: its rows are never locked without the limit.
            await cur.execute("SET LOCAL idle_in_transaction_session_timeout = %s", (round(self.claim_limit * 1000),))
            await cur.execute(CLAIM, (self._batch_size,))
            rows = await cur.fetchall()
            if not rows:
                return 0
            publishes = [
                asyncio.ensure_future(
                    exchange.publish(
                        aio_pika.Message(
                            bytes(payload),
                            message_id=str(event_id),
                            correlation_id=correlation_id,
                            type=routing_key,
                            content_type="application/json",
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        ),
                        routing_key=routing_key,
                        mandatory=True,
                        timeout=self._confirm_timeout,
                    )
                )
                for event_id, routing_key, payload, correlation_id in rows
            ]
            # The batch is bounded as a whole: a publish's own timeout covers
            # its confirm, not the wait for a connection that dropped
            # mid-batch, and meanwhile this transaction holds its rows. Those
            # still out at the bound are cancelled, given a moment to settle
            # (not to be left running against a channel about to be
            # dropped), and fail alone: the confirmed ones are still marked
            # below, where a bound on the whole batch rolled them back to be
            # published again.
            try:
                _, late = await asyncio.wait(publishes, timeout=2 * self._confirm_timeout)
            finally:
                for publish in publishes:
                    publish.cancel()  # nothing, for those done; all of them, if we are cancelled
            if late:
                await asyncio.wait(late, timeout=self._confirm_timeout)
            outcomes = [_outcome(publish, late) for publish in publishes]
            # The rows the broker confirmed are marked sent even when others
            # failed: kept back with them, a whole batch would be published
            # again on every retry, for as long as one row keeps failing.
            sent, returned, failure = [], {}, None
            for (event_id, routing_key, *_), outcome in zip(rows, outcomes, strict=True):
                if not isinstance(outcome, BaseException):
                    sent.append(str(event_id))
                    continue
                if isinstance(outcome, aio_pika.exceptions.PublishError):
                    # Not even the alternate exchange took it: the broker lacks our
                    # definitions. Not a failure of the relay's: the rest go on.
                    returned[str(event_id)] = routing_key
                    continue
                if isinstance(outcome, asyncio.CancelledError):
                    # One publish cancelled, not this task: aiormq cancels the
                    # confirms still pending when a channel closes. Raised as
                    # it is, that would end run() as if stopped, silently,
                    # with the outbox filling up behind it.
                    if (task := asyncio.current_task()) is not None and task.cancelling():
                        raise outcome
                    cancelled, outcome = outcome, ConnectionError("a publish was cancelled: its channel closed")
                    outcome.__cause__ = cancelled
                failure = failure or outcome
            if sent:
                await cur.execute(SETTLE, {"sent": sent})
            if returned:
                await cur.execute(HOLD, {"returned": list(returned), "hold": self._returned_hold})
        if returned:
            log.error(
                "outbox_events_unroutable",
                event_ids=list(returned),
                routing_keys=sorted(set(returned.values())),
                retry_in=self._returned_hold,
            )
        if failure is not None:
            raise failure
        return len(sent)

    def stop(self) -> None:
        """Make ``run`` return after the batch in hand (see ``worker_ctx``)."""
        self._stopped.set()
        self._wake.set()

    async def run(self) -> None:
        delay = 0.1
        while not self._stopped.is_set():
            # Cleared before looking, so that a commit made while a batch is
            # published wakes the next wait instead of being lost.
            self._wake.clear()
            try:
                with server_cancels_as_errors():
                    sent = await self.publish_batch()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The broker or the database is away: the rows stay unsent and are tried again.
                await self._drop_channel()
                if isinstance(exc, OUTAGES):
                    log.warning(
                        "outbox_publish_failed", error=type(exc).__name__, detail=str(exc), retry_in=round(delay, 2)
                    )
                else:
                    log.error("outbox_publish_failed", error=type(exc).__name__, retry_in=round(delay, 2), exc_info=exc)
                # Woken by stop() too: a shutdown does not sit out the backoff.
                await wait_event(self._stopped, delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.1
            if sent:
                log.debug("outbox_published", count=sent)
                continue
            await wait_event(self._wake, self._poll_interval)


def outbox_relay_ctx() -> CleanupCtx:
    """Run the relay for the app's lifetime. Needs the database and AMQP contexts first, and ``OUTBOX_COMMITTED``.

    Stopped, it has the time its batch in hand may take to finish: its bound
    for the broker, then one statement of the database's for the marking.
    Cut short, the batch rolls back, and what the broker confirmed meanwhile
    is published again by the next relay to claim it.
    """
    return worker_ctx(
        "outbox-relay",
        lambda app: OutboxRelay(app[DB], app[AMQP], committed=app[OUTBOX_COMMITTED]),
        grace=batch_bound(CONFIRM_TIMEOUT) + STATEMENT_TIMEOUT,
    )
