"""A relay's claim on outbox rows ends with the relay: frozen, it goes back to the others; slow, it is kept.

Against the real PostgreSQL; the broker is a double (relay_support.py), as
a real one cannot be made to confirm late, or to take its client down, on cue.
"""

from __future__ import annotations

import asyncio

import aio_pika
import aiopg
import pytest

from devstack.config import StackConfig
from mesh_common.events import Event
from mesh_common.outbox import enqueue
from mesh_common.relay import OutboxRelay, batch_bound
from mesh_common.testing.proxy import TcpProxy
from mesh_common.transactions import transaction

from .conftest import Poll
from .relay_support import FakeBroker, all_published, locked, unsent

CONFIRM = 0.5  # seconds: a short bound, so a claim's limit (derived from it) runs out in the test


async def _enqueue(db: aiopg.Pool, count: int) -> list[str]:
    events = [Event(type="todo.created", user_id="u", data={"id": f"t{n}"}, correlation_id="c") for n in range(count)]
    async with transaction(db) as cur:
        for event in events:
            await enqueue(cur, event)
    return [event.id for event in events]


async def test_a_frozen_instances_claim_goes_back_to_the_other_relays_in_bounded_time(
    infra: StackConfig, db: aiopg.Pool, poll: Poll
) -> None:
    [event_id] = await _enqueue(db, 1)
    proxy = TcpProxy(infra.ports.postgres)
    await proxy.start()
    claimed = asyncio.Event()

    async def freeze_with_its_claim(message: aio_pika.Message) -> None:
        # Confirmed, and the instance freezes before it marks the row: its
        # session is left idle in its transaction, holding the row's lock.
        proxy.freeze()
        claimed.set()

    published: list[str] = []

    async def confirm(message: aio_pika.Message) -> None:
        published.append(str(message.message_id))

    other = OutboxRelay(db, FakeBroker(confirm), poll_interval=0.05, confirm_timeout=CONFIRM)  # type: ignore[arg-type]
    dsn = infra.database_url("todo").replace(f":{infra.ports.postgres}/", f":{proxy.port}/")
    async with aiopg.create_pool(dsn, minsize=0, maxsize=1) as proxied:
        frozen = OutboxRelay(proxied, FakeBroker(freeze_with_its_claim), confirm_timeout=CONFIRM)  # type: ignore[arg-type]
        stuck = asyncio.create_task(frozen.publish_batch())
        running: asyncio.Task[None] | None = None
        try:
            async with asyncio.timeout(5):
                await claimed.wait()
            assert await locked(db, event_id)  # held, by a session the server still thinks alive
            running = asyncio.create_task(other.run())
            # Without a limit of its own, the claim was held until TCP gave up: about two hours.
            await poll(lambda: published, within=frozen.claim_limit + 3)
            assert published == [event_id]
            await poll(lambda: all_published(db), within=3)
            assert not stuck.done()  # the frozen relay never ran again: the server let go by itself
        finally:
            other.stop()
            if running is not None:
                async with asyncio.timeout(5):
                    await running
            stuck.cancel()
            await asyncio.gather(stuck, return_exceptions=True)
            await proxy.close()


async def test_a_batch_slow_to_the_end_of_its_bound_keeps_its_claim_and_marks_what_was_confirmed(
    db: aiopg.Pool,
) -> None:
    confirmed, stalled = await _enqueue(db, 2)

    async def slow(message: aio_pika.Message) -> None:
        if message.message_id == confirmed:
            await asyncio.sleep(0.9 * CONFIRM)  # a confirm near its own timeout
            return
        try:
            await asyncio.Event().wait()  # never confirmed
        except asyncio.CancelledError:
            await asyncio.sleep(0.9 * CONFIRM)  # and slow to settle once given up on: the whole bound used
            raise

    relay = OutboxRelay(db, FakeBroker(slow), confirm_timeout=CONFIRM)  # type: ignore[arg-type]
    started = asyncio.get_running_loop().time()
    # A TimeoutError for the stalled publish, not an OperationalError for a session the server ended.
    with pytest.raises(TimeoutError):
        await relay.publish_batch()
    assert asyncio.get_running_loop().time() - started > 0.9 * batch_bound(CONFIRM)  # it did wait that long
    assert await unsent(db) == {stalled}
