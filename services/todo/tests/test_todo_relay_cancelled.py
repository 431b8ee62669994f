"""A publish cancelled under the relay, or never settled, is a failure to retry, never its end nor a held row."""

from __future__ import annotations

import asyncio
from typing import Any

import aiopg
import pytest
from psycopg2.extensions import QueryCanceledError

from mesh_common.events import Event
from mesh_common.outbox import enqueue
from mesh_common.relay import OutboxRelay
from mesh_common.transactions import transaction


class _ClosingChannel:
    """What aiormq does to confirms still pending when a channel closes: cancels them.

    Only this one call is staged; a real broker cannot be made to close a
    channel between a publish and its confirm on cue.
    """

    async def declare_exchange(self, *args: Any, **kwargs: Any) -> _ClosingChannel:
        return self

    async def publish(self, *args: Any, **kwargs: Any) -> None:
        raise asyncio.CancelledError

    async def close(self) -> None:
        pass


class _Connection:
    transport = None  # aio-pika's: where the broker's blocking shows, and a double's never blocked

    async def ready(self) -> None:
        pass

    async def channel(self, **kwargs: Any) -> _ClosingChannel:
        return _ClosingChannel()


async def test_a_cancelled_publish_keeps_the_row_and_is_raised_as_a_failure(db: aiopg.Pool) -> None:
    event = Event(type="todo.created", user_id="u", data={"id": "t"}, correlation_id="c")
    async with transaction(db) as cur:
        await enqueue(cur, event)
    relay = OutboxRelay(db, _Connection())  # type: ignore[arg-type]

    # Not CancelledError: raised as it was, it ended run() as if stopped, in silence.
    with pytest.raises(ConnectionError, match="cancelled"):
        await relay.publish_batch()
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT published_at FROM outbox WHERE id = %s", (event.id,))
        assert await cur.fetchone() == (None,)


async def test_a_statement_the_server_cancelled_is_a_failure_to_retry_not_the_relays_end(db: aiopg.Pool) -> None:
    relay = OutboxRelay(db, _Connection(), poll_interval=0.05)  # type: ignore[arg-type]
    batches = 0

    async def publish_batch() -> int:
        nonlocal batches
        batches += 1
        if batches == 1:
            try:  # what aiopg raises for a statement the server cancelled
                raise QueryCanceledError("canceling statement due to user request")
            except QueryCanceledError:
                raise asyncio.CancelledError from None
        return 0

    relay.publish_batch = publish_batch  # type: ignore[method-assign]
    running = asyncio.create_task(relay.run())
    async with asyncio.timeout(5):
        while batches < 3:  # it went on, after its back-off
            await asyncio.sleep(0.02)
    assert not running.done()
    relay.stop()
    async with asyncio.timeout(5):
        await running


class _StalledChannel(_ClosingChannel):
    """A publish that never hears back: its connection dropped, and it waits for the next one."""

    async def publish(self, *args: Any, **kwargs: Any) -> None:
        await asyncio.Event().wait()


class _StalledConnection(_Connection):
    async def channel(self, **kwargs: Any) -> _ClosingChannel:
        return _StalledChannel()


async def test_a_publish_that_never_settles_gives_its_rows_back_in_bounded_time(db: aiopg.Pool) -> None:
    event = Event(type="todo.created", user_id="u", data={"id": "t"}, correlation_id="c")
    async with transaction(db) as cur:
        await enqueue(cur, event)
    relay = OutboxRelay(db, _StalledConnection(), confirm_timeout=0.2)  # type: ignore[arg-type]

    async with asyncio.timeout(5):  # without a bound of its own, it waited for ever holding the row
        with pytest.raises(TimeoutError):
            await relay.publish_batch()
    async with db.acquire() as conn, conn.cursor() as cur:
        # Unsent, and no longer locked by a transaction left open.
        await cur.execute("SELECT published_at FROM outbox WHERE id = %s FOR UPDATE NOWAIT", (event.id,))
        assert await cur.fetchone() == (None,)


async def test_a_relay_in_its_back_off_stops_at_once(db: aiopg.Pool) -> None:
    """The shutdown gives a worker time to finish its batch, not to sit out a back-off."""
    relay = OutboxRelay(db, _Connection(), poll_interval=0.05)  # type: ignore[arg-type]
    batches = 0

    async def publish_batch() -> int:
        nonlocal batches
        batches += 1
        raise ConnectionError("the broker is away")

    relay.publish_batch = publish_batch  # type: ignore[method-assign]
    running = asyncio.create_task(relay.run())
    async with asyncio.timeout(10):
        while batches < 5:  # back-offs of 0.1, 0.2, 0.4 and 0.8 s: it now waits 1.6 s
            await asyncio.sleep(0.01)
    relay.stop()
    # Well short of the 1.6 s, and far above what stopping takes (milliseconds).
    async with asyncio.timeout(1.0):
        await running


async def test_the_rows_the_broker_confirmed_are_marked_sent_when_others_failed(db: aiopg.Pool) -> None:
    events = [Event(type="todo.created", user_id="u", data={"id": f"t{n}"}, correlation_id="c") for n in range(3)]
    async with transaction(db) as cur:
        for event in events:
            await enqueue(cur, event)
    failing = events[1].id

    class _OneFails(_ClosingChannel):
        async def publish(self, message: Any, *args: Any, **kwargs: Any) -> None:
            if message.message_id == failing:
                raise ConnectionError("this one was not confirmed")

    class _OneFailsConnection(_Connection):
        async def channel(self, **kwargs: Any) -> _ClosingChannel:
            return _OneFails()

    relay = OutboxRelay(db, _OneFailsConnection())  # type: ignore[arg-type]
    with pytest.raises(ConnectionError, match="not confirmed"):
        await relay.publish_batch()
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "SELECT id::text FROM outbox WHERE id = ANY(%s::uuid[]) AND published_at IS NULL", ([e.id for e in events],)
        )
        # Only the failed one is sent again: not the whole batch, on every retry.
        assert await cur.fetchall() == [(failing,)]


async def test_the_rows_the_broker_confirmed_are_marked_sent_when_another_never_settles(db: aiopg.Pool) -> None:
    events = [Event(type="todo.created", user_id="u", data={"id": f"t{n}"}, correlation_id="c") for n in range(3)]
    async with transaction(db) as cur:
        for event in events:
            await enqueue(cur, event)
    stalled = events[1].id

    class _OneStalls(_ClosingChannel):
        async def publish(self, message: Any, *args: Any, **kwargs: Any) -> None:
            if message.message_id == stalled:
                await asyncio.Event().wait()

    class _OneStallsConnection(_Connection):
        async def channel(self, **kwargs: Any) -> _ClosingChannel:
            return _OneStalls()

    relay = OutboxRelay(db, _OneStallsConnection(), confirm_timeout=0.2)  # type: ignore[arg-type]
    async with asyncio.timeout(5):
        with pytest.raises(TimeoutError):
            await relay.publish_batch()
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "SELECT id::text FROM outbox WHERE id = ANY(%s::uuid[]) AND published_at IS NULL", ([e.id for e in events],)
        )
        # The batch's bound ran out for one publish: the two confirmed are
        # not published again with it.
        assert await cur.fetchall() == [(stalled,)]
