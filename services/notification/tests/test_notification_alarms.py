"""A resource alarm blocks the consumer's copies, never its consuming: the backlog drains during the alarm.

RabbitMQ blocks a connection that publishes while a memory or disk alarm is
on, by no longer reading from it, acks included; a connection that only
consumes goes on. These tests raise a disk alarm on the test broker (the root conftest's
``disk_alarm``) and always put it back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import replace

from notification_support import Broker, StartService, eventually, new_user, verification_requested
from smtp_sink import SmtpSink

from mesh_common.amqp import AMQP, AMQP_PUBLISHING, blocked
from notification_service.keys import CONSUMER
from notification_service.settings import Settings
from notification_service.topology import Topology

DiskAlarm = Callable[[], AbstractAsyncContextManager[None]]  # the root conftest's fixture
GOOD = 40  # more than the prefetch window (32): the last ones come only once the first are acked


async def test_a_retry_during_a_disk_alarm_holds_its_event_and_the_good_ones_are_all_sent(
    disk_alarm: DiskAlarm, settings: Settings, start_service: StartService, broker: Broker, smtp: SmtpSink
) -> None:
    # On one connection, the first copy for a retry queue got it blocked: the
    # good events' acks went unread, and the 9 past the prefetch window never
    # came. Slow DATA makes the good ones end after that copy went out.
    deferred = new_user()
    smtp.refuse[deferred["email"]] = "451 4.3.0 Try again later"
    smtp.data_delay = 0.2
    good = [verification_requested(new_user()) for _ in range(GOOD)]
    await broker.publish(verification_requested(deferred))
    for event in good:
        await broker.publish(event)

    async with disk_alarm():
        service = await start_service(smtp=replace(settings.smtp, attempts=1))
        consumer = service.app[CONSUMER]
        await eventually(lambda: len(smtp.received) == GOOD, within=30, what="every good email, during the alarm")
        await eventually(lambda: consumer.settled["acked"] == GOOD, within=10, what="every good event acked")
        # Its copy waits for the alarm to clear, its message in hand: not
        # given back to come straight back and spend its delivery-limit.
        await eventually(lambda: consumer.copies.held, within=20, what="the deferred event held")
        assert consumer.copies.blocked
        assert not blocked(service.app[AMQP])  # the consuming connection: never
        assert consumer.settled["requeued"] == 0
        assert {r.recipients[0] for r in smtp.received} == {e.data["email"] for e in good}

    del smtp.refuse[deferred["email"]]
    # The alarm cleared: the held copy goes out, and the event is retried and sent.
    await eventually(lambda: smtp.to(deferred["email"]), within=30, what="the held event's email")
    assert consumer.settled["requeued"] == 0


async def test_a_delivery_held_by_an_alarm_is_given_back_at_once_when_the_service_stops(
    disk_alarm: DiskAlarm, settings: Settings, start_service: StartService, broker: Broker, smtp: SmtpSink,
    topology: Topology,
) -> None:  # fmt: skip
    deferred = new_user()
    smtp.refuse[deferred["email"]] = "451 4.3.0 Try again later"
    await broker.publish(verification_requested(deferred))

    async with disk_alarm():
        service = await start_service(smtp=replace(settings.smtp, attempts=1))
        consumer = service.app[CONSUMER]
        # Its copy went out, and the broker blocked the connection it went out on.
        connections = [c for c in (service.app.get(AMQP), service.app.get(AMQP_PUBLISHING)) if c is not None]
        await eventually(lambda: any(map(blocked, connections)), within=20, what="a connection blocked")
        stopping = time.monotonic()
        await service.close()
        # Not after the drain's 10 s, cut short with the delivery still waiting.
        assert time.monotonic() - stopping < 5.0
        assert consumer.settled["requeued"] == 1
        await eventually(lambda: broker.ready(topology.queue), within=10, what="the event back in the queue")
