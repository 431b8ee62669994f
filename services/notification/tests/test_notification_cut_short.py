"""A send under way is not cut short by the broker, and one cut short by a shutdown is accounted for.

aiormq cancels the tasks it runs a channel's consumer callbacks in when
the channel closes, and a connection drop closes it. Run there, a delivery
in DATA was cancelled with it: its claim left ``sending``, uncounted, and
the email sent again once the lease ran out. A shutdown whose drain ends
with a send in hand cuts it short on purpose: that send is released (it
had not reached DATA) or counted as one whose outcome is unknown.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aiopg
import pytest
from direct_sends import claim_row, verify_email
from notification_support import (
    MAIL_FROM,
    Broker,
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
from smtp_sink import SmtpSink, silent_smtp

from notification_service import claims, workers
from notification_service.consumer import STUCK_CANCEL_TIMEOUT
from notification_service.cut_short import CUT_SHORT_GRACE
from notification_service.keys import CONSUMER, SETTINGS
from notification_service.mailer import Mailer
from notification_service.notifier import Notifier
from notification_service.settings import Settings, SmtpSettings
from notification_service.topology import Topology

# How long the server holds the email in DATA after the broker drops the connection.
HELD_IN_DATA = 2.0


def quick_smtp(settings: Settings, **changes: Any) -> SmtpSettings:
    """SMTP settings for a short lease (about 16 s): a takeover, and the duplicate it sends, come within the test."""
    return dataclasses.replace(settings.smtp, **{"attempts": 1, "timeout": 1.0, "data_timeout": 5.0, **changes})


async def status_is(pool: aiopg.Pool, event_id: str, status: str) -> bool:
    row = await claim_row(pool, event_id)
    return row is not None and row[0] == status


async def test_a_broker_connection_dropped_during_data_neither_cuts_the_send_short_nor_duplicates_it(
    settings: Settings,
    start_service: StartService,
    broker: Broker,
    smtp: SmtpSink,
    users: FakeUserService,
    management: Management,
    pool: aiopg.Pool,
    topology: Topology,
) -> None:
    service = await start_service(smtp=quick_smtp(settings))
    consumer = service.app[CONSUMER]
    connection = await amqp_connection(management, service.app[SETTINGS].service.instance_id)
    owner = users.add(new_user())
    event = todo_event("completed", owner["id"], {"id": "t-drop", "title": "Drop", "completed": True})
    smtp.data_gate = asyncio.Event()
    try:
        await broker.publish(event)
        await eventually(lambda: smtp.to(owner["email"]), within=10, what="the email in DATA")
        await drop_amqp_connection(management, connection)
        # The server takes the email a moment later, on a connection the
        # delivery still holds: it was not cancelled with the channel.
        await asyncio.sleep(HELD_IN_DATA)  # the scenario itself: the 250 comes after the drop
        smtp.data_gate.set()
        await eventually(lambda: status_is(pool, event.id, "sent"), within=5, what="the email recorded as sent")
        # Its ack died with the channel: redelivered, the event finds the email sent.
        await eventually(lambda: consumer.settled["acked"] >= 1, within=30, what="the redelivered event acked")
    finally:
        smtp.data_gate.set()
    for queue in (topology.queue, *topology.retry_queues):
        assert await broker.ready(queue) == 0
    assert len(smtp.to(owner["email"])) == 1

    assert await claim_row(pool, event.id) == ("sent", 0)


async def test_a_send_in_data_when_the_drain_runs_out_is_counted_as_one_with_no_answer(
    settings: Settings,
    start_service: StartService,
    broker: Broker,
    smtp: SmtpSink,
    pool: aiopg.Pool,
    topology: Topology,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Uncounted, its claim was taken over once the lease ran out and the
    # email sent again: as often as shutdowns cut it short.
    monkeypatch.setattr(workers, "DRAIN_TIMEOUT", 0.5)
    client = await start_service(smtp=quick_smtp(settings))
    smtp.data_gate = asyncio.Event()  # the server answers after the drain has run out
    event = verification_requested(new_user())
    try:
        await broker.publish(event)
        await eventually(lambda: smtp.received, within=10, what="the email in DATA")
        await asyncio.wait_for(client.close(), timeout=0.5 + STUCK_CANCEL_TIMEOUT + 5)
    finally:
        smtp.data_gate.set()
    assert await claim_row(pool, event.id) == ("sending", 1)  # sent once more at most, after the lease
    await eventually(lambda: broker.ready(topology.queue), within=10, what="the event back in the queue")


async def test_a_send_cut_short_before_data_releases_its_claim(
    settings: Settings,
    start_service: StartService,
    broker: Broker,
    pool: aiopg.Pool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A server that takes the connection and never greets: the drain runs out
    # before DATA. Left claimed, the email waited for the lease to run out.
    monkeypatch.setattr(workers, "DRAIN_TIMEOUT", 0.5)
    event = verification_requested(new_user())
    async with silent_smtp() as silent:
        client = await start_service(smtp=quick_smtp(settings, port=silent.port, timeout=30.0))
        await broker.publish(event)
        await eventually(lambda: silent.accepted, within=10, what="the SMTP connection")
        await eventually(lambda: claim_row(pool, event.id), within=5, what="the claim")
        await asyncio.wait_for(client.close(), timeout=0.5 + STUCK_CANCEL_TIMEOUT + 5)
    assert await claim_row(pool, event.id) is None  # the next start sends it at once


async def test_a_send_cut_short_waiting_for_the_answer_to_data_releases_its_claim(
    pool: aiopg.Pool, smtp: SmtpSink
) -> None:
    # The message goes out only after the server's 354: counted as a send
    # with no answer, the email was held for a lease and could end
    # unconfirmed without ever having been sent.
    smtp.silent_at_data = 1
    mailer = Mailer(SmtpSettings(host="127.0.0.1", port=smtp.port, mail_from=MAIL_FROM, data_timeout=30.0))
    notifier = Notifier(pool, mailer, None, sender=MAIL_FROM)  # type: ignore[arg-type]
    event_id = str(uuid.uuid4())
    try:
        delivery = asyncio.create_task(verify_email(notifier, event_id))
        await eventually(lambda: smtp.unanswered, within=10, what="the DATA command, unanswered")
        delivery.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(delivery, timeout=CUT_SHORT_GRACE + 2)
    finally:
        await mailer.close()
    assert await claim_row(pool, event_id) is None  # the next delivery sends it at once
    assert smtp.received == []


async def test_a_reminder_in_data_when_the_scheduler_stops_is_counted_as_one_with_no_answer(
    settings: Settings,
    start_service: StartService,
    broker: Broker,
    smtp: SmtpSink,
    users: FakeUserService,
    pool: aiopg.Pool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(workers, "SCHEDULER_STOP_TIMEOUT", 2.0)
    client = await start_service(smtp=quick_smtp(settings))
    owner = users.add(new_user())
    due = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    created = todo_event("created", owner["id"], {"id": "t-cut", "title": "Cut", "due_at": due, "completed": False})
    smtp.data_gate = asyncio.Event()
    try:
        await broker.publish(created)
        await eventually(lambda: smtp.to(owner["email"]), within=10, what="the reminder in DATA")
        await asyncio.wait_for(client.close(), timeout=2.0 + 2.0 + 5)
    finally:
        smtp.data_gate.set()
    assert await claim_row(pool, created.id) == ("sending", 1)


async def test_a_delivery_cancelled_while_it_records_its_email_sent_still_records_it(
    pool: aiopg.Pool, smtp: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The email is out: cut in the middle, the claim stayed 'sending', to be
    # taken over after its lease and sent again.
    recording = asyncio.Event()
    mark_sent = claims.mark_notification_sent

    async def slow_mark_sent(*args: Any) -> None:
        recording.set()
        await asyncio.sleep(0.5)  # a database slow to answer
        await mark_sent(*args)

    monkeypatch.setattr(claims, "mark_notification_sent", slow_mark_sent)
    mailer = Mailer(SmtpSettings(host="127.0.0.1", port=smtp.port, mail_from=MAIL_FROM))
    notifier = Notifier(pool, mailer, None, sender=MAIL_FROM)  # type: ignore[arg-type]
    event_id = str(uuid.uuid4())
    try:
        delivery = asyncio.create_task(verify_email(notifier, event_id))
        await asyncio.wait_for(recording.wait(), timeout=10)
        delivery.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(delivery, timeout=CUT_SHORT_GRACE + 2)
    finally:
        await mailer.close()
    assert await claim_row(pool, event_id) == ("sent", 0)
