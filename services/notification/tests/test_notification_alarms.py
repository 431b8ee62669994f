"""A resource alarm blocks the consumer's copies, never its consuming: the backlog drains during the alarm.

RabbitMQ blocks a connection that publishes while a memory or disk alarm is
on, by no longer reading from it, acks included; a connection that only
consumes goes on. These tests raise a disk alarm on the test broker (its
``disk_free_limit`` set above the free space) and always put the limit back.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from notification_support import Broker, StartService, eventually, new_user, verification_requested
from smtp_sink import SmtpSink

from devstack import rabbitmq
from devstack.config import StackConfig
from devstack.procs import run_checked
from mesh_common.amqp import AMQP, AMQP_PUBLISHING, blocked
from notification_service.keys import CONSUMER
from notification_service.settings import Settings
from notification_service.topology import Topology

GOOD = 40  # more than the prefetch window (32): the last ones come only once the first are acked
ALARM_BOUND = 60.0  # how long the broker may take to raise or clear the alarm


def rabbitmqctl(infra: StackConfig, *args: str) -> str:
    # As the stack runs it: the rabbitmq user, with the node's environment (devstack.rabbitmq).
    return run_checked(
        ["/usr/lib/rabbitmq/bin/rabbitmqctl", "-q", *args], env=rabbitmq._env(infra), user="rabbitmq", timeout=30
    )


def status(infra: StackConfig) -> dict[str, Any]:
    answer: dict[str, Any] = json.loads(rabbitmqctl(infra, "status", "--formatter", "json"))
    return answer


@asynccontextmanager
async def disk_alarm(infra: StackConfig) -> AsyncIterator[None]:
    """The broker's disk alarm on, for the block; its limit put back after, and the alarm seen cleared."""
    before = await asyncio.to_thread(status, infra)
    assert not before["alarms"], f"an alarm is on already: {before['alarms']}"
    limit = str(before["disk_free_limit"])
    try:
        await asyncio.to_thread(rabbitmqctl, infra, "set_disk_free_limit", str(10 * int(before["disk_free"])))
        await _alarms_are(infra, on=True)
        yield
    finally:
        await asyncio.to_thread(rabbitmqctl, infra, "set_disk_free_limit", limit)
        await _alarms_are(infra, on=False)


async def _alarms_are(infra: StackConfig, *, on: bool) -> None:
    deadline = time.monotonic() + ALARM_BOUND
    while bool((await asyncio.to_thread(status, infra))["alarms"]) != on:
        assert time.monotonic() < deadline, f"the broker's alarm never went {'on' if on else 'off'}"
        await asyncio.sleep(0.5)


async def test_a_retry_during_a_disk_alarm_holds_its_event_and_the_good_ones_are_all_sent(
    infra: StackConfig, settings: Settings, start_service: StartService, broker: Broker, smtp: SmtpSink
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

    async with disk_alarm(infra):
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
    infra: StackConfig, settings: Settings, start_service: StartService, broker: Broker, smtp: SmtpSink,
    topology: Topology,
) -> None:  # fmt: skip
    deferred = new_user()
    smtp.refuse[deferred["email"]] = "451 4.3.0 Try again later"
    await broker.publish(verification_requested(deferred))

    async with disk_alarm(infra):
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
