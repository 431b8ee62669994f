"""Each dead letter says why it died (``x-dead-reason``), and ``dlq replay`` can pick the letters of one reason.

Before, the consumer rejected, and the broker recorded ``rejected`` for
every cause alike: after a long SMTP outage, the letters that had run out of
retries sat beside the malformed and the refused ones, all the same.
"""

from __future__ import annotations

from dataclasses import replace

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from notification_support import Broker, StartService, eventually, new_user, verification_requested
from smtp_sink import SmtpSink

from devstack.config import StackConfig
from mesh_common.events import Event
from mesh_common.testing import run_module
from notification_service.consumer import EventConsumer
from notification_service.dlq import list_dead_letters, replay_dead_letters
from notification_service.failures import MailServerUnavailable
from notification_service.keys import CONSUMER
from notification_service.notifier import Outcome
from notification_service.settings import Settings
from notification_service.settling import RETRIES_EXHAUSTED
from notification_service.topology import Topology


class Deferred:
    """A handler whose mail server is always busy."""

    def __init__(self) -> None:
        self.calls = 0

    async def handle(self, event: Event) -> Outcome | None:
        self.calls += 1
        raise MailServerUnavailable("SMTP 451")


async def _dead(broker: Broker, topology: Topology, count: int) -> bool:
    return await broker.ready(topology.dead_letters) == count


async def test_letters_are_listed_with_their_reasons_and_replayed_by_reason(
    infra: StackConfig, settings: Settings, start_service: StartService, broker: Broker, smtp: SmtpSink,
    topology: Topology,
) -> None:  # fmt: skip
    refused, deferred = new_user(), new_user()
    smtp.refuse[refused["email"]] = "550 5.1.1 No such mailbox"
    smtp.refuse[deferred["email"]] = "451 4.3.0 Try again later"
    events = {
        "refused": verification_requested(refused),
        "deferred": verification_requested(deferred),
        "malformed": verification_requested(new_user()),
    }
    service = await start_service(smtp=replace(settings.smtp, attempts=1), retry_limit=1)
    await broker.publish(events["refused"])
    await broker.publish(events["deferred"])
    await broker.publish(events["malformed"], body=b'{"type": "user.registered", "id": ')
    await eventually(lambda: _dead(broker, topology, 3), within=20, what="3 dead letters")

    letters = {d.event_id: (d.reason, d.retries) for d in await list_dead_letters(infra.amqp_url, topology, limit=10)}
    assert letters == {
        events["refused"].id: ("mail_rejected", 0),
        events["deferred"].id: (RETRIES_EXHAUSTED, 1),  # retried once (the limit), then given up on
        events["malformed"].id: ("malformed", 0),
    }
    env = {"AMQP_URL": infra.amqp_url, "EVENTS_EXCHANGE": topology.exchange, "NOTIFICATION_QUEUES": topology.namespace}
    status, listed, err = await run_module("notification_service", "dlq", "list", env=env)
    assert status == 0, err
    assert "RETRIES" in listed.splitlines()[0]
    assert {line.split()[0]: line.split()[2] for line in listed.splitlines()[1:4]} == {
        event_id: reason for event_id, (reason, _) in letters.items()
    }
    only = await list_dead_letters(infra.amqp_url, topology, limit=10, reason="malformed")
    assert [d.event_id for d in only] == [events["malformed"].id]

    smtp.refuse.clear()  # the outage is over: the letters it killed go back
    replayed = await replay_dead_letters(infra.amqp_url, topology, limit=10, reason=RETRIES_EXHAUSTED)

    assert [d.event_id for d in replayed] == [events["deferred"].id]
    await eventually(lambda: smtp.to(deferred["email"]), within=10, what="the replayed event's email")
    assert smtp.to(refused["email"]) == []
    left = {d.event_id: d.reason for d in await list_dead_letters(infra.amqp_url, topology, limit=10)}
    assert left == {events["refused"].id: "mail_rejected", events["malformed"].id: "malformed"}
    assert service.app[CONSUMER].settled["dead_lettered"] == 3


async def test_a_replayed_letter_leaves_the_reason_and_the_counts_behind(
    infra: StackConfig, broker: Broker, topology: Topology
) -> None:
    handler = Deferred()
    event = verification_requested(new_user())
    async with (
        await aio_pika.connect_robust(infra.amqp_url) as connection,
        await aio_pika.connect_robust(infra.amqp_url) as publishing,
    ):
        consumer = EventConsumer(connection, handler, topology, publishing=publishing, prefetch=4, retry_limit=1)
        await consumer.start()
        try:
            await broker.publish(event)
            await eventually(lambda: _dead(broker, topology, 1), within=15, what="the dead letter")
        finally:
            await consumer.stop()
    [letter] = await list_dead_letters(infra.amqp_url, topology, limit=10)
    assert (letter.reason, letter.retries, letter.deaths) == (RETRIES_EXHAUSTED, 1, 1)  # deaths: its retry queue's
    assert letter.died_at is not None

    [replayed] = await replay_dead_letters(infra.amqp_url, topology, limit=10, reason=RETRIES_EXHAUSTED)

    assert replayed.event_id == event.id
    message = await broker.channel.get_queue(topology.queue)
    copy = await eventually(lambda: message.get(no_ack=True, fail=False), within=5, what="the replayed copy")
    # A fresh start: no reason, no counts, no deaths (x-delivery-count: the broker's, on this delivery).
    assert {k: v for k, v in copy.headers.items() if k != "x-delivery-count"} == {"x-replays": 1}


class DeadLetterCopyFails(EventConsumer):
    """Our consumer, except that the broker does not take its dead letters' copies."""

    copies_failed = 0

    async def _publish(
        self, message: AbstractIncomingMessage, copy: aio_pika.Message, exchange: str, routing_key: str
    ) -> bool:
        if exchange == self._topology.dead_letter_exchange:
            self.copies_failed += 1
            raise TimeoutError("the copy was not confirmed in time")
        return await super()._publish(message, copy, exchange, routing_key)


async def test_a_dead_letter_whose_copy_fails_is_dead_lettered_by_the_broker_without_its_reason(
    infra: StackConfig, broker: Broker, topology: Topology
) -> None:
    handler = Deferred()
    event = verification_requested(new_user())
    async with (
        await aio_pika.connect_robust(infra.amqp_url) as connection,
        await aio_pika.connect_robust(infra.amqp_url) as publishing,
    ):
        consumer = DeadLetterCopyFails(connection, handler, topology, publishing=publishing, prefetch=4, retry_limit=0)
        await consumer.start()
        try:
            await broker.publish(event)
            await eventually(lambda: _dead(broker, topology, 1), within=15, what="the dead letter")
        finally:
            await consumer.stop()
    # Not given back to fail again until the delivery-limit: in the DLQ at once.
    assert (handler.calls, consumer.copies_failed, consumer.settled["dead_lettered"]) == (1, 1, 1)
    [letter] = await list_dead_letters(infra.amqp_url, topology, limit=10)
    assert (letter.event_id, letter.reason) == (event.id, "rejected")
