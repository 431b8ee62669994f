"""Poison messages end in the dead-letter queue, visibly, and everything else keeps flowing."""

from __future__ import annotations

import json
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import FieldValue
from notification_support import (
    Broker,
    Client,
    FakeUserService,
    eventually,
    new_user,
    todo_event,
    verification_requested,
)
from smtp_sink import SmtpSink

from devstack.config import StackConfig
from mesh_common.events import Event
from mesh_common.testing import run_module
from notification_service.consumer import EventConsumer
from notification_service.dlq import list_dead_letters, replay_dead_letters
from notification_service.failures import MailServerUnavailable
from notification_service.keys import CONSUMER
from notification_service.notifier import Outcome
from notification_service.settling import FAILURE_LIMIT, FAILURES_EXHAUSTED
from notification_service.topology import Topology


def poison() -> list[tuple[Event, bytes | None, str]]:
    """Messages that can never be handled, each with the body to send (None: the event's own) and its reason."""
    user = new_user()
    malformed = verification_requested(user)
    not_an_object = verification_requested(user)
    future = Event(type="user.registered", user_id=user["id"], data={}, correlation_id="c", version=2)
    unknown = todo_event("archived", user["id"], {"id": "t", "title": "Old"})
    no_email = Event(
        type="user.email_verification_requested", user_id=user["id"], data={"user_id": user["id"]}, correlation_id="c"
    )
    return [(malformed, b'{"type": "user.registered", "id": ', "malformed"), (not_an_object, b"[1, 2, 3]", "malformed"),
            (future, None, "unsupported"), (unknown, None, "unsupported"), (no_email, None, "malformed")]  # fmt: skip


async def test_poison_goes_to_the_dlq_while_100_good_events_around_it_are_all_delivered(
    service: Client, broker: Broker, smtp: SmtpSink, infra: StackConfig, topology: Topology
) -> None:
    bad = poison()
    good = [verification_requested(new_user()) for _ in range(100)]
    for n, event in enumerate(good):
        await broker.publish(event)
        if n % 20 == 10:
            poisoned, body, _ = bad[n // 20]
            await broker.publish(poisoned, body=body)

    consumer = service.app[CONSUMER]
    await eventually(lambda: consumer.settled["acked"] == 100, within=30, what="100 good events acked")
    await eventually(lambda: consumer.settled["dead_lettered"] == len(bad), within=10, what="poison dead-lettered")

    delivered = {r.recipients[0] for r in smtp.received}
    assert len(smtp.received) == 100
    assert delivered == {e.data["email"] for e in good}  # lost 0, duplicates 0

    letters = await eventually(
        lambda: _all_letters(infra.amqp_url, topology, len(bad)), within=10, what="the dead letters listed"
    )
    # Each with why, refused at once: no retries wasted on them.
    assert {d.event_id: (d.reason, d.retries) for d in letters} == {e.id: (reason, 0) for e, _, reason in bad}
    # Listing left them in the queue (the broker puts them back when the listing's channel closes).
    await eventually(lambda: _ready_is(broker, topology.dead_letters, len(bad)), within=10, what="letters back")


async def test_a_letter_that_waited_in_a_retry_queue_is_listed_with_its_last_reason(
    service: Client, broker: Broker, smtp: SmtpSink, infra: StackConfig, topology: Topology
) -> None:
    user = new_user()
    smtp.refuse[user["email"]] = "451 4.7.1 Try again later"
    event = verification_requested(user)
    await broker.publish(event)
    await eventually(lambda: service.app[CONSUMER].settled["retried"] >= 1, within=10, what="a retry")
    smtp.refuse[user["email"]] = "550 5.1.1 No such mailbox"  # when the retry queue hands it back
    await eventually(lambda: broker.ready(topology.dead_letters), within=15, what="the refused email dead-lettered")

    [letter] = await list_dead_letters(infra.amqp_url, topology, limit=10)
    # It expired from the retry queue first, then was refused: the latter is why it is dead.
    assert (letter.event_id, letter.reason, letter.retries) == (event.id, "mail_rejected", 1)


async def test_an_envelope_with_a_null_user_id_is_dead_lettered_not_taken_for_a_deleted_user(
    service: Client, broker: Broker, smtp: SmtpSink, users: FakeUserService
) -> None:
    owner = users.add(new_user())
    event = todo_event("completed", owner["id"], {"id": "t-null", "title": "Null", "completed": True})
    body = json.dumps({**json.loads(event.to_json()), "user_id": None}).encode()
    await broker.publish(event, body=body)

    consumer = service.app[CONSUMER]
    await eventually(lambda: consumer.settled["dead_lettered"] == 1, within=10, what="the event dead-lettered")
    assert consumer.settled["acked"] == 0
    assert smtp.received == []


class AlwaysFailing:
    """A handler with a bug: every delivery raises."""

    def __init__(self) -> None:
        self.calls = 0

    async def handle(self, event: Event) -> Outcome | None:
        self.calls += 1
        raise RuntimeError("a bug")


async def test_an_event_failing_unexpectedly_is_dead_lettered_after_its_failure_limit(
    infra: StackConfig, broker: Broker, topology: Topology, delivery_limit: int
) -> None:
    handler = AlwaysFailing()
    async with (
        await aio_pika.connect_robust(infra.amqp_url) as connection,
        await aio_pika.connect_robust(infra.amqp_url) as publishing,
    ):
        consumer = EventConsumer(connection, handler, topology, publishing=publishing, prefetch=4, retry_limit=10)
        await consumer.start()
        try:
            event = verification_requested(new_user())
            await broker.publish(event)
            await eventually(lambda: broker.ready(topology.dead_letters), within=15, what="the dead letter")
        finally:
            await consumer.stop()

    # Counted by the consumer, not by the broker's delivery-limit (a backstop, larger).
    assert delivery_limit > FAILURE_LIMIT
    assert handler.calls == FAILURE_LIMIT + 1  # the first delivery and `FAILURE_LIMIT` more
    assert (consumer.settled["failed"], consumer.settled["dead_lettered"], consumer.settled["requeued"]) == (
        FAILURE_LIMIT,
        1,
        0,
    )
    [letter] = await list_dead_letters(infra.amqp_url, topology, limit=10)
    assert (letter.event_id, letter.reason, letter.failures) == (event.id, FAILURES_EXHAUSTED, FAILURE_LIMIT)


class Failing:
    def __init__(self, failure: Exception) -> None:
        self.failure = failure
        self.calls = 0

    async def handle(self, event: Event) -> Outcome | None:
        self.calls += 1
        raise self.failure


@pytest.mark.parametrize(
    ("header", "value", "failure"),
    [
        # Each failure would put the count up by one, from -100000: as many
        # redeliveries at once, a hot loop.
        ("x-failures", -100000, RuntimeError("a bug")),
        # Never past the retry limit: retried for ever.
        ("x-retries", -1_000_000_000, MailServerUnavailable("SMTP 451")),
        # Raised on, the settling failed: back at once, until the delivery-limit.
        ("x-failures", "many", RuntimeError("a bug")),
        ("x-retries", [1], MailServerUnavailable("SMTP 451")),
    ],
)
async def test_a_message_whose_count_header_is_no_count_is_dead_lettered_at_once(
    infra: StackConfig, broker: Broker, topology: Topology, header: str, value: FieldValue, failure: Exception
) -> None:
    handler = Failing(failure)
    event = verification_requested(new_user())
    message = aio_pika.Message(event.to_json(), message_id=event.id, type=event.type, headers={header: value})
    await broker.channel.default_exchange.publish(message, routing_key=topology.queue)
    async with (
        await aio_pika.connect_robust(infra.amqp_url) as connection,
        await aio_pika.connect_robust(infra.amqp_url) as publishing,
    ):
        consumer = EventConsumer(connection, handler, topology, publishing=publishing, prefetch=4, retry_limit=10)
        await consumer.start()
        try:
            await eventually(lambda: broker.ready(topology.dead_letters), within=15, what="the dead letter")
        finally:
            await consumer.stop()

    assert handler.calls == 1
    assert (consumer.settled["dead_lettered"], consumer.settled["requeued"]) == (1, 0)
    [letter] = await list_dead_letters(infra.amqp_url, topology, limit=10)
    assert (letter.event_id, letter.reason) == (event.id, "malformed")


class OutageOnce:
    """One transient failure (the event goes to a retry queue), then success."""

    def __init__(self) -> None:
        self.deferred = 0
        self.handled = 0

    async def handle(self, event: Event) -> Outcome | None:
        if not self.deferred:
            self.deferred += 1
            raise MailServerUnavailable("SMTP 451")
        self.handled += 1
        return Outcome.SENT


async def test_a_replayed_letter_can_still_go_through_a_retry_queue(
    infra: StackConfig, broker: Broker, topology: Topology, delivery_limit: int
) -> None:
    # A letter the broker dead-lettered from our queue (delivery_limit: its
    # x-death names our queue), replayed into it, then parked in a retry
    # queue: when the retry queue dead-letters it back, the broker must not
    # take the old death for a loop of expiries and drop it. Our own dead
    # letters (a copy, then ack) carry no x-death of our queue.
    event = verification_requested(new_user())
    await broker.publish(event)
    async with await aio_pika.connect(infra.amqp_url) as crashing:
        queue = await (await crashing.channel()).get_queue(topology.queue)

        async def handed_back() -> bool:
            # As by a consumer that crashes on it, every time.
            if (message := await queue.get(no_ack=False, fail=False)) is not None:
                await message.nack(requeue=True)
            return await _ready_is(broker, topology.dead_letters, 1)

        await eventually(handed_back, within=30, what="the event dead-lettered at the delivery-limit")
    [letter] = await list_dead_letters(infra.amqp_url, topology, limit=10)
    assert (letter.event_id, letter.reason) == (event.id, "delivery_limit")

    handler = OutageOnce()
    async with (
        await aio_pika.connect_robust(infra.amqp_url) as connection,
        await aio_pika.connect_robust(infra.amqp_url) as publishing,
    ):
        consumer = EventConsumer(connection, handler, topology, publishing=publishing, prefetch=4, retry_limit=10)
        await consumer.start()
        try:
            assert len(await replay_dead_letters(infra.amqp_url, topology, limit=10)) == 1
            await eventually(lambda: handler.handled == 1, within=15, what="the replayed event, after its retry")
        finally:
            await consumer.stop()
    assert (handler.deferred, consumer.settled["retried"]) == (1, 1)


async def test_a_dead_letter_replayed_after_the_fault_is_fixed_is_delivered(
    service: Client, broker: Broker, smtp: SmtpSink, infra: StackConfig, topology: Topology
) -> None:
    user = new_user()
    smtp.refuse[user["email"]] = "550 5.1.1 No such mailbox"
    event = verification_requested(user)
    await broker.publish(event)
    await eventually(lambda: broker.ready(topology.dead_letters), within=10, what="the refused email dead-lettered")

    listed = await _cli("dlq", "list", infra=infra, topology=topology)
    assert event.id in listed and "mail_rejected" in listed

    del smtp.refuse[user["email"]]  # the mailbox exists now
    replayed = await replay_dead_letters(infra.amqp_url, topology, limit=10)
    assert [d.event_id for d in replayed] == [event.id]

    [message] = await eventually(lambda: smtp.to(user["email"]), within=10, what="the replayed email")
    assert message["Subject"] == "Confirm your email address for todo-mesh"
    assert await broker.ready(topology.dead_letters) == 0


async def test_replay_can_pick_one_event_and_leaves_the_others(
    service: Client, broker: Broker, smtp: SmtpSink, infra: StackConfig, topology: Topology
) -> None:
    users = [new_user() for _ in range(3)]
    events = [verification_requested(u) for u in users]
    for user, event in zip(users, events, strict=True):
        smtp.refuse[user["email"]] = "550 5.1.1 No such mailbox"
        await broker.publish(event)
    await eventually(lambda: _ready_is(broker, topology.dead_letters, 3), within=10, what="3 dead letters")
    smtp.refuse.clear()

    replayed = await replay_dead_letters(infra.amqp_url, topology, limit=10, event_id=events[1].id)

    assert [d.event_id for d in replayed] == [events[1].id]
    await eventually(lambda: smtp.to(users[1]["email"]), within=10, what="the chosen event's email")
    assert sorted(d.event_id for d in await list_dead_letters(infra.amqp_url, topology, limit=10)) == sorted(
        [events[0].id, events[2].id]
    )


async def _all_letters(amqp_url: str, topology: Topology, count: int) -> Any:
    letters = await list_dead_letters(amqp_url, topology, limit=100)
    return letters if len(letters) == count else None


async def _ready_is(broker: Broker, queue: str, count: int) -> bool:
    return await broker.ready(queue) == count


async def _cli(*args: str, infra: StackConfig, topology: Topology) -> str:
    """Run ``python -m notification_service ...`` as an operator would."""
    env = {
        "AMQP_URL": infra.amqp_url,
        "EVENTS_EXCHANGE": topology.exchange,
        "NOTIFICATION_QUEUES": topology.namespace,
    }
    status, out, err = await run_module("notification_service", *args, env=env)
    assert status == 0, err
    return out
