"""No lost events: a committed todo's event reaches the broker, whatever happens in between.

Two ways to lose an event without an outbox: commit while the broker is
unreachable, or crash between the commit and the publish. The first is
staged here against the real PostgreSQL and RabbitMQ (in this suite's own
virtual host; the shared broker itself is never stopped: the end-to-end
suite does that); the second, a real process killed, in
test_todo_outbox_crash.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import aiopg
import pytest
from structlog.testing import capture_logs

from devstack import rabbitmq
from mesh_common.events import EVENTS_EXCHANGE, Event
from mesh_common.outbox import enqueue
from mesh_common.relay import OutboxRelay
from mesh_common.testing import LeavesConsulFirst, refused_port
from todo_service.app import create_app
from todo_service.model import NewTodo
from todo_service.todos import Todos

from .relay_support import all_published, outbox

DEFINITIONS = Path(__file__).resolve().parents[3] / "rabbitmq" / "definitions.json"


@pytest.fixture
def no_broker_port() -> Iterator[int]:
    # Held for the whole test: a port found free and let go could be taken
    # by some other listener meanwhile, and the outage would not be one.
    with refused_port() as port:
        yield port


async def test_todos_commit_while_the_broker_is_unreachable_and_no_event_is_lost(
    aiohttp_client, settings, tokens, alice, db, event_tap, amqp_url, poll, no_broker_port
):
    no_broker = dataclasses.replace(settings, amqp_url=f"amqp://guest:guest@127.0.0.1:{no_broker_port}/")
    client = await aiohttp_client(LeavesConsulFirst(create_app(no_broker, verifier=tokens.verifier())))
    tap = await event_tap("todo.created")

    async def create(n: int) -> int:
        resp = await client.post("/todos", json={"title": f"todo {n}"}, headers=alice.headers)
        return resp.status

    statuses = []
    for batch in range(10):
        statuses += await asyncio.gather(*(create(batch * 20 + n) for n in range(20)))
    assert statuses == [201] * 200
    committed = await outbox(db)
    assert len(committed) == 200 and not any(committed.values())
    assert (await client.get("/health")).status == 200  # still in service without a broker

    # A relay that can reach the broker, as the instance's own would once it is back.
    connection = await aio_pika.connect_robust(amqp_url)
    relay = OutboxRelay(db, connection)
    running = asyncio.create_task(relay.run())
    try:
        await poll(lambda: all_published(db), within=30)
    finally:
        relay.stop()
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await connection.close()

    received = [message.message_id for message in await tap.everything_confirmed("todo.created")]
    consumed = set(received)
    lost = set(committed) - consumed
    print(
        f"events: committed {len(committed)}, consumed {len(consumed)}, lost {len(lost)},"
        f" duplicates {len(received) - len(consumed)}"
    )
    assert lost == set()
    assert consumed == set(committed)


class WatchedRelay(OutboxRelay):
    """A relay that says when a look at the outbox found nothing, and it is about to wait."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.idle = asyncio.Event()

    async def publish_batch(self) -> int:
        sent = await super().publish_batch()
        if not sent:
            self.idle.set()
        return sent


async def test_a_committed_change_wakes_its_relay_rather_than_waiting_for_the_poll(
    alice, db, amqp_url, event_tap, poll
):
    tap = await event_tap("todo.created")
    committed = asyncio.Event()
    connection = await aio_pika.connect_robust(amqp_url)
    relay = WatchedRelay(db, connection, poll_interval=3600, committed=committed)
    running = asyncio.create_task(relay.run())
    try:
        # Nothing to publish yet: the relay has looked, and waits for an hour or a wake-up.
        async with asyncio.timeout(10):
            await relay.idle.wait()
        created = await Todos(db, committed).create(alice.id, NewTodo("Wake up"), correlation_id="wake-test")
        message = await tap.next(within=10)
        assert json.loads(message.body)["data"]["id"] == created.snapshot["id"]
    finally:
        relay.stop()
        await asyncio.gather(running, return_exceptions=True)
        await connection.close()


async def test_a_change_with_events_commits_without_a_notify(alice, db):
    # A transaction that ran NOTIFY commits behind a lock held for the whole
    # PostgreSQL cluster (see mesh_common/outbox.py): none may run one.
    async with db.acquire() as listener:
        async with listener.cursor() as cur:
            await cur.execute("LISTEN outbox")
            await cur.execute("LISTEN outbox_test_sentinel")
        await Todos(db, asyncio.Event()).create(alice.id, NewTodo("Quietly"), correlation_id="notify-test")
        # Notifications arrive in commit order: once the sentinel is here, any
        # NOTIFY of the change's commit would have been too.
        async with db.acquire() as conn, conn.cursor() as cur:
            await cur.execute("NOTIFY outbox_test_sentinel")
        channels: list[str] = []
        async with asyncio.timeout(10):
            while not channels or channels[-1] != "outbox_test_sentinel":
                channels.append((await listener.notifies.get()).channel)
        async with listener.cursor() as cur:
            await cur.execute("UNLISTEN *")
    assert channels == ["outbox_test_sentinel"]


async def enqueue_event(db: aiopg.Pool, routing_key: str) -> str:
    """An event committed to the outbox, as a service's transaction would leave it."""
    event = Event(type=routing_key, user_id=str(uuid.uuid4()), data={}, correlation_id="relay-test")
    async with db.acquire() as conn, conn.cursor() as cur:
        await enqueue(cur, event)
    return event.id


async def test_an_event_the_broker_returns_as_unroutable_stays_in_the_outbox_until_a_queue_takes_it(
    db, amqp_url, event_tap
):
    # This suite's virtual host has no definitions, so no alternate exchange:
    # with no queue bound for the key, the broker returns the event.
    routing_key = f"test.unrouted.{uuid.uuid4().hex}"
    event_id = await enqueue_event(db, routing_key)
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        relay = OutboxRelay(db, connection, returned_hold=0.5)
        with capture_logs() as logs:
            assert await relay.publish_batch() == 0
        assert await outbox(db) == {event_id: False}  # not marked sent: it would be lost
        [unroutable] = [e for e in logs if e["event"] == "outbox_events_unroutable"]
        assert (unroutable["event_ids"], unroutable["routing_keys"]) == ([event_id], [routing_key])

        tap = await event_tap(routing_key)
        assert await relay.publish_batch() == 0  # held back for now
        async with asyncio.timeout(5):
            while not await relay.publish_batch():  # until the hold is over
                await asyncio.sleep(0.05)
        assert (await tap.next()).message_id == event_id
    assert await outbox(db) == {event_id: True}


async def test_a_batch_of_returned_events_holds_up_no_event_behind_it(db, amqp_url, event_tap):
    # The returned rows are the oldest: claimed first every time, a batch of
    # them kept the relay from ever reaching the events after them.
    returned = [await enqueue_event(db, f"test.unrouted.{uuid.uuid4().hex}") for _ in range(3)]
    routed_key = f"test.routed.{uuid.uuid4().hex}"
    tap = await event_tap(routed_key)
    routed = await enqueue_event(db, routed_key)
    async with await aio_pika.connect_robust(amqp_url) as connection:
        relay = OutboxRelay(db, connection, batch_size=len(returned))
        assert await relay.publish_batch() == 0
        assert await relay.publish_batch() == 1
        assert (await tap.next()).message_id == routed
    assert await outbox(db) == {**dict.fromkeys(returned, False), routed: True}


@pytest.fixture
def defined_vhost(infra):
    """A virtual host of its own with rabbitmq/definitions.json's topology: what the stack's broker loads at boot."""
    vhost = f"relay-{uuid.uuid4().hex[:8]}"
    rabbitmq.vhost(infra, vhost)
    full = json.loads(DEFINITIONS.read_text())
    kinds = ("exchanges", "queues", "bindings", "policies")
    ours = {kind: [{**item, "vhost": vhost} for item in full[kind]] for kind in kinds}
    rabbitmq.management(infra, "POST", "/definitions", ours)
    yield vhost
    rabbitmq.management(infra, "DELETE", f"/vhosts/{vhost}")


async def test_with_our_definitions_an_event_no_one_subscribes_to_is_parked_and_the_relay_goes_on(
    infra, db, defined_vhost, poll
):
    events_exchange = f"/exchanges/{defined_vhost}/{EVENTS_EXCHANGE}"
    # The alternate exchange is set by a policy, which the broker applies on its own time.
    await poll(lambda: _policy_of(infra, events_exchange), within=10)
    nobody = await enqueue_event(db, f"test.nobody.listens.{uuid.uuid4().hex}")
    welcome = await enqueue_event(db, "user.registered")
    url = f"amqp://guest:guest@127.0.0.1:{infra.ports.amqp}/{defined_vhost}"
    async with await aio_pika.connect_robust(url) as connection:
        assert await OutboxRelay(db, connection).publish_batch() == 2
        assert await outbox(db) == {nobody: True, welcome: True}

        channel = await connection.channel()
        parked = await (await channel.get_queue("todo-mesh.unrouted")).get(fail=False)
        subscribed = await (await channel.get_queue("notifications.events")).get(fail=False)
    assert parked is not None and parked.message_id == nobody
    assert subscribed is not None and subscribed.message_id == welcome


async def _policy_of(infra, path: str) -> str | None:
    exchange = await asyncio.to_thread(rabbitmq.management, infra, "GET", path)
    return exchange.get("policy")
