"""A relay stopped mid-batch finishes it: what the broker confirmed is marked sent, not published again.

Against the real PostgreSQL, through ``outbox_relay_ctx`` as the app runs
it; the broker is a double (relay_support.py) that confirms late.
"""

from __future__ import annotations

import asyncio

import aio_pika
import aiopg
from aiohttp import web

from mesh_common.amqp import AMQP
from mesh_common.db import DB
from mesh_common.events import Event
from mesh_common.outbox import OUTBOX_COMMITTED, enqueue
from mesh_common.relay import CONFIRM_TIMEOUT, outbox_relay_ctx
from mesh_common.transactions import transaction

from .relay_support import FakeBroker, unsent


async def test_a_relay_stopped_as_its_confirms_come_late_marks_them_sent(db: aiopg.Pool) -> None:
    event = Event(type="todo.created", user_id="u", data={"id": "t"}, correlation_id="c")
    async with transaction(db) as cur:
        await enqueue(cur, event)
    publishing = asyncio.Event()

    async def confirm_late(message: aio_pika.Message) -> None:
        # Past the confirm timeout, within the batch's bound: a publish held
        # while its connection came back, then sent again and confirmed.
        publishing.set()
        await asyncio.sleep(1.2 * CONFIRM_TIMEOUT)

    app = web.Application()
    app[DB] = db
    app[AMQP] = FakeBroker(confirm_late)  # type: ignore[misc]
    app[OUTBOX_COMMITTED] = asyncio.Event()
    async with asyncio.timeout(30):
        async with outbox_relay_ctx()(app):
            await publishing.wait()  # the shutdown comes mid-batch
    # Cut off after 5 s, the batch rolled back, and the next relay sent the event again.
    assert await unsent(db) == set()


async def test_a_relay_waiting_for_the_broker_stops_at_once(db: aiopg.Pool) -> None:
    """With no batch in hand there is nothing to finish: the shutdown does not sit out the grace."""
    waiting = asyncio.Event()

    class Away(FakeBroker):
        async def ready(self) -> None:
            waiting.set()
            await asyncio.Event().wait()  # a robust connection to a broker that is down

    app = web.Application()
    app[DB] = db
    app[AMQP] = Away(_never_published)  # type: ignore[misc]
    app[OUTBOX_COMMITTED] = asyncio.Event()
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(30):
        async with outbox_relay_ctx()(app):
            await waiting.wait()
            stopping = loop.time()
    # Far below the grace (19 s), and the 5 s it was before that; milliseconds, as a rule.
    assert loop.time() - stopping < 1.0


async def _never_published(message: aio_pika.Message) -> None:
    raise AssertionError("published without a broker")
