"""An email with no answer after DATA is sent once more at most, then given up on as unconfirmed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any

import aiopg
import pytest
from direct_sends import claim_row, verify_email
from notification_support import MAIL_FROM, Broker, StartService, eventually, new_user, verification_requested
from smtp_sink import SmtpSink

from notification_service import claims, repository
from notification_service.directory import Recipient
from notification_service.failures import (
    DatabaseUnavailable,
    DeliveryInProgress,
    MailOutcomeUnknown,
    MailServerUnavailable,
)
from notification_service.keys import CONSUMER, NOTIFIER
from notification_service.mailer import Mailer, Send
from notification_service.notifier import Notifier, Outcome
from notification_service.reminders import Reminders, ReminderScheduler, TodoSnapshot
from notification_service.settings import Settings, SmtpSettings

# Longer than a send, which gives up 0.2 s after DATA. Half of it bounds the
# record of a send with no answer: 0.25 s was too little for a real UPDATE
# and COMMIT on a busy machine, and the test got DatabaseUnavailable.
LEASE = 1.5


class Ada:
    async def recipient(self, user_id: str) -> Recipient:
        return Recipient("ada@example.test", "Ada", verified=True)


@pytest.fixture
async def notifier(pool: aiopg.Pool, smtp: SmtpSink) -> AsyncIterator[Notifier]:
    """A notifier whose every email reaches the server, and whose 250 comes too late."""
    smtp.data_delay = 2.0
    mailer = Mailer(SmtpSettings(host="127.0.0.1", port=smtp.port, mail_from=MAIL_FROM, attempts=1, data_timeout=0.2))
    notifier = Notifier(pool, mailer, Ada(), sender=MAIL_FROM)  # type: ignore[arg-type]
    notifier.lease = LEASE
    try:
        yield notifier
    finally:
        await mailer.close()


async def test_no_answer_after_data_twice_ends_unconfirmed_and_the_email_is_not_sent_a_third_time(
    notifier: Notifier, smtp: SmtpSink, pool: aiopg.Pool
) -> None:
    event_id = str(uuid.uuid4())
    with pytest.raises(MailOutcomeUnknown):
        await verify_email(notifier, event_id)
    # Within its lease: the lease a claim is judged by is the caller's, made
    # long here so that a slow minute cannot let this one take it over.
    notifier.lease = 60
    with pytest.raises(DeliveryInProgress):
        await verify_email(notifier, event_id)
    notifier.lease = LEASE
    await asyncio.sleep(LEASE)
    assert await verify_email(notifier, event_id) is Outcome.UNCONFIRMED  # sent again, once, with no answer either
    await asyncio.sleep(LEASE)
    assert await verify_email(notifier, event_id) is Outcome.UNCONFIRMED  # and not again, however long after

    assert len(smtp.received) == 2
    assert await claim_row(pool, event_id) == ("unconfirmed", 2)
    # Not in the user's history of sent emails: nobody knows that it arrived.
    assert await repository.sent_notifications(pool, "u1", limit=10, before=None) == []


async def test_a_resend_refused_before_data_keeps_the_count_of_unknown_sends(
    notifier: Notifier, smtp: SmtpSink, pool: aiopg.Pool
) -> None:
    event_id = str(uuid.uuid4())
    with pytest.raises(MailOutcomeUnknown):
        await verify_email(notifier, event_id)
    await asyncio.sleep(LEASE)
    smtp.refuse["ada@example.test"] = "451 4.3.0 Try again later"
    with pytest.raises(MailServerUnavailable):
        await verify_email(notifier, event_id)
    assert await claim_row(pool, event_id) == ("sending", 1)  # not released: the count would go with it

    del smtp.refuse["ada@example.test"]
    await asyncio.sleep(LEASE)
    assert await verify_email(notifier, event_id) is Outcome.UNCONFIRMED
    assert len(smtp.received) == 2


async def test_an_event_whose_email_is_unconfirmed_is_acked(
    settings: Settings, start_service: StartService, broker: Broker, smtp: SmtpSink, pool: aiopg.Pool
) -> None:
    smtp.data_delay = 2.0
    service = await start_service(smtp=replace(settings.smtp, data_timeout=0.3))
    service.app[NOTIFIER].lease = 1.0  # so that the retry 1 s later finds it run out
    event = verification_requested(new_user())
    await broker.publish(event)

    consumer = service.app[CONSUMER]
    await eventually(lambda: consumer.settled["acked"] == 1, within=20, what="the event acked")
    assert len(smtp.received) == 2
    assert consumer.settled["dead_lettered"] == 0
    assert await claim_row(pool, event.id) == ("unconfirmed", 2)


async def test_a_reminder_whose_email_is_unconfirmed_is_done_with(
    notifier: Notifier, smtp: SmtpSink, pool: aiopg.Pool
) -> None:
    reminders = Reminders(pool, lead=24 * 3600, wake_window=1, wake=lambda: None)
    snapshot = TodoSnapshot("x1", "u1", "Unanswered", datetime.now(UTC) + timedelta(hours=1), False, False, 1)
    await reminders.apply(snapshot, event_id=str(uuid.uuid4()), event_at=datetime.now(UTC))
    scheduler = ReminderScheduler(pool, notifier, poll_interval=1)

    await scheduler._send_due()  # sent, no answer: held
    await asyncio.sleep(LEASE)
    await scheduler._send_due()  # sent again, no answer again: given up on
    await scheduler._send_due()

    assert len(smtp.received) == 2
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT sent_at IS NOT NULL, cancelled FROM reminders WHERE todo_id = 'x1'")
        assert await cur.fetchone() == (True, False)  # out of the schedule, not met by every round


async def test_a_server_silent_at_the_data_command_twice_still_gets_the_email_once(
    settings: Settings, start_service: StartService, broker: Broker, smtp: SmtpSink, pool: aiopg.Pool
) -> None:
    # No 354, so no message sent: counted as a send with no answer, the claim
    # was held for its lease and then given up on as unconfirmed, never sent.
    smtp.silent_at_data = 2
    service = await start_service(smtp=replace(settings.smtp, data_timeout=0.3))
    event = verification_requested(new_user())
    await broker.publish(event)

    consumer = service.app[CONSUMER]
    ended = await eventually(lambda: _final(pool, event.id), within=30, what="the email sent, or given up on")
    assert ended == ("sent", 0)
    assert smtp.unanswered == ["DATA", "DATA"]
    assert len(smtp.received) == 1
    await eventually(lambda: consumer.settled["acked"] == 1, within=5, what="the event acked")


async def _final(pool: aiopg.Pool, event_id: str) -> tuple[str, int] | None:
    row = await claim_row(pool, event_id)
    return row if row is not None and row[0] != "sending" else None


class NoAnswer:
    """A mailer whose every send goes out with no answer after DATA."""

    longest_send = 1.0
    recipient_hourly_limit = 10

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[Send]:
        async def send(message: EmailMessage, progress: Send) -> None:
            progress.body_started = True
            raise MailOutcomeUnknown("no answer after DATA: SMTPReadTimeoutError")

        yield Send(send)


async def test_an_unknown_send_recorded_twice_over_a_lost_answer_counts_once(
    pool: aiopg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The database takes the write and the answer never comes (aiopg's
    # timeout closes the socket; PostgreSQL commits all the same): written
    # again, the count reached 2 after one send, and the one resend never came.
    record = claims.record_unknown_send
    calls = 0

    async def answer_lost_once(*args: Any) -> bool:
        nonlocal calls
        calls += 1
        made_unconfirmed = await record(*args)
        if calls == 1:
            raise DatabaseUnavailable("TimeoutError")
        return made_unconfirmed

    monkeypatch.setattr(claims, "record_unknown_send", answer_lost_once)
    notifier = Notifier(pool, NoAnswer(), Ada(), sender=MAIL_FROM)  # type: ignore[arg-type]
    event_id = str(uuid.uuid4())
    with pytest.raises(MailOutcomeUnknown):
        await verify_email(notifier, event_id)
    assert calls == 2
    assert await claim_row(pool, event_id) == ("sending", 1)  # sent once more, after the lease
