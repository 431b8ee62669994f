"""Dependencies go away and come back: every email still goes out, exactly once.

The outages last ``OUTAGE_SECONDS``, the 30 s of the issue: long enough that
every event goes through the 1 s, 5 s and 30 s retry queues while the
dependency is down.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import replace
from typing import Any

import aiopg
import pytest
from notification_support import (
    Broker,
    Client,
    FakeUserService,
    Management,
    StartService,
    amqp_connection,
    drop_amqp_connection,
    eventually,
    new_user,
    todo_event,
    verification_requested,
)
from smtp_sink import SmtpSink
from yarl import URL

from devstack.config import StackConfig
from mesh_common.amqp import AMQP
from mesh_common.testing import sleep_until_cancelled_by_the_server
from mesh_common.testing.proxy import TcpProxy
from notification_service import repository
from notification_service.failures import DatabaseUnavailable
from notification_service.keys import CONSUMER, SETTINGS
from notification_service.settings import Settings

OUTAGE_SECONDS = 30.0
EVENTS = 100
DB_EVENTS = 10
# Back within the slowest retry tier (30 s) after the dependency returns.
RECOVERY_BOUND = 45.0


async def test_smtp_down_for_a_while_then_back_loses_no_email(service: Client, broker: Broker, smtp: SmtpSink) -> None:
    await smtp.stop()
    down_since = time.monotonic()
    events = [verification_requested(new_user()) for _ in range(EVENTS)]
    for event in events:
        await broker.publish(event)

    consumer = service.app[CONSUMER]
    await eventually(lambda: consumer.settled["retried"] >= EVENTS, within=10, what="every event failing once")
    # The outage itself: a fixed span, not a wait for a condition.
    await asyncio.sleep(OUTAGE_SECONDS - (time.monotonic() - down_since))
    assert smtp.received == []
    await smtp.start()

    await eventually(lambda: len(smtp.received) >= EVENTS, within=RECOVERY_BOUND, what="every email after the outage")
    await eventually(lambda: consumer.settled["acked"] == EVENTS, within=10, what="every event acked")
    sent = Counter(r.recipients[0] for r in smtp.received)
    expected = {e.data["email"] for e in events}
    assert expected - set(sent) == set()  # lost 0
    assert [n for n in sent.values() if n > 1] == []  # duplicates 0


async def test_a_relay_refusing_us_for_a_while_loses_no_email(service: Client, broker: Broker, smtp: SmtpSink) -> None:
    # A 5xx at RCPT, but about us (RFC 3463's X.7: policy): every recipient
    # is refused alike until the relay is put right. Taken for the
    # recipient's fault, each event went to the DLQ.
    user = new_user()
    smtp.refuse[user["email"]] = "554 5.7.1 <" + user["email"] + ">: Relay access denied"
    await broker.publish(verification_requested(user))

    consumer = service.app[CONSUMER]
    await eventually(lambda: consumer.settled["retried"] >= 1, within=10, what="a retry")
    del smtp.refuse[user["email"]]  # the relay is put right
    await eventually(lambda: smtp.to(user["email"]), within=15, what="the email once the relay takes it")
    assert consumer.settled["dead_lettered"] == 0


async def test_user_service_down_for_a_while_then_back_loses_no_email(
    settings: Settings, start_service: StartService, broker: Broker, smtp: SmtpSink, users: FakeUserService
) -> None:
    # One owner's hundred emails: each an email that must not be lost, not a stranger flooded (recipient_cap.py).
    service = await start_service(smtp=replace(settings.smtp, recipient_hourly_limit=EVENTS))
    owner = users.add(new_user())
    await users.stop()
    down_since = time.monotonic()
    events = [
        todo_event("completed", owner["id"], {"id": f"t{n}", "title": f"Task {n}", "completed": True})
        for n in range(EVENTS)
    ]
    for event in events:
        await broker.publish(event)

    consumer = service.app[CONSUMER]
    await eventually(lambda: consumer.settled["retried"] >= EVENTS, within=10, what="every event failing once")
    await asyncio.sleep(OUTAGE_SECONDS - (time.monotonic() - down_since))
    assert smtp.received == []
    await users.start()

    await eventually(
        lambda: len(smtp.to(owner["email"])) >= EVENTS, within=RECOVERY_BOUND, what="every email after the outage"
    )
    await eventually(lambda: consumer.settled["acked"] == EVENTS, within=10, what="every event acked")
    subjects = Counter(m["Subject"] for m in smtp.to(owner["email"]))
    assert set(subjects) == {f"Done: Task {n}" for n in range(EVENTS)}  # lost 0
    assert set(subjects.values()) == {1}  # duplicates 0


async def test_postgresql_away_for_a_while_then_back_loses_no_email(
    infra: StackConfig, start_service: StartService, broker: Broker, smtp: SmtpSink
) -> None:
    proxy = TcpProxy(infra.ports.postgres)
    try:
        await proxy.start()
        through_proxy = str(URL(infra.database_url("notification")).with_port(proxy.port))
        service = await start_service(database_url=through_proxy)
        consumer = service.app[CONSUMER]
        await proxy.cut()  # as in a restart: connections dropped, new ones refused
        events = [verification_requested(new_user()) for _ in range(DB_EVENTS)]
        for event in events:
            await broker.publish(event)

        # Each event fails twice (once more after the 1 s retry queue), and is
        # sent to a retry queue each time: not redelivered at once, which would
        # spend the delivery-limit in milliseconds and dead-letter good events.
        await eventually(
            lambda: consumer.settled["retried"] >= 2 * DB_EVENTS, within=15, what="every event deferred twice"
        )
        assert consumer.settled["requeued"] == 0
        assert await broker.ready(broker.topology.dead_letters) == 0
        await proxy.start()

        await eventually(lambda: len(smtp.received) >= DB_EVENTS, within=RECOVERY_BOUND, what="every email")
        await eventually(lambda: consumer.settled["acked"] == DB_EVENTS, within=10, what="every event acked")
    finally:
        await proxy.close()
    sent = Counter(r.recipients[0] for r in smtp.received)
    assert set(sent) == {e.data["email"] for e in events}  # lost 0
    assert set(sent.values()) == {1}  # duplicates 0
    assert await broker.ready(broker.topology.dead_letters) == 0


async def test_postgresql_away_for_a_moment_after_the_server_took_an_email_sends_it_once(
    infra: StackConfig, settings: Any, start_service: StartService, broker: Broker, smtp: SmtpSink
) -> None:
    # Short SMTP deadlines make a short claim lease (about 10 s): a takeover,
    # and the duplicate it sends, come within the test.
    quick = replace(settings.smtp, attempts=1, timeout=1.0, data_timeout=2.0)
    proxy = TcpProxy(infra.ports.postgres)
    try:
        await proxy.start()
        through_proxy = str(URL(infra.database_url("notification")).with_port(proxy.port))
        consumer = (await start_service(database_url=through_proxy, smtp=quick)).app[CONSUMER]
        smtp.data_gate = asyncio.Event()
        user = new_user()
        await broker.publish(verification_requested(user))
        await eventually(lambda: smtp.to(user["email"]), within=10, what="the email's DATA")
        await proxy.cut()  # PostgreSQL goes away while the server checks the email...
        smtp.data_gate.set()  # ...which it then takes: the email is out, not yet recorded
        await asyncio.sleep(1)  # the outage's length is the subject here
        await proxy.start()
        # Within the retry queues' 1, 5 and 30 s, and the lease: the duplicate had time to go out.
        await eventually(lambda: consumer.settled["acked"] == 1, within=60, what="the event acked")
    finally:
        await proxy.close()
    assert len(smtp.to(user["email"])) == 1


async def test_the_consumer_comes_back_after_the_broker_drops_its_connection(
    service: Client, broker: Broker, smtp: SmtpSink, management: Management
) -> None:
    reconnected = asyncio.Event()
    service.app[AMQP].reconnect_callbacks.add(lambda *_: reconnected.set())
    connection = await amqp_connection(management, service.app[SETTINGS].service.instance_id)
    await drop_amqp_connection(management, connection)

    user = new_user()
    await broker.publish(verification_requested(user))
    await eventually(lambda: smtp.to(user["email"]), within=20, what="the email after the reconnection")
    assert reconnected.is_set()


async def test_a_statement_the_server_cancels_is_the_database_unavailable_for_now(pool: aiopg.Pool) -> None:
    # aiopg reports it as a cancellation; taken for a bug, the event was
    # redelivered at once and dead-lettered within its delivery limit.
    with pytest.raises(DatabaseUnavailable):
        async with asyncio.timeout(8), repository.cursor(pool) as cur:
            await sleep_until_cancelled_by_the_server(cur, pool)
