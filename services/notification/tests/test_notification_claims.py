"""A claim on an email decides who sends it: one holder at a time, taken over only once its lease runs out."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace
from typing import Any

import aiopg
from direct_sends import notification_rows, verify_email
from notification_support import (
    MAIL_FROM,
    Broker,
    StartService,
    eventually,
    new_user,
    verification_requested,
)
from smtp_sink import SmtpSink

from notification_service.claims import Claim, claim_notification, release_notification
from notification_service.keys import CONSUMER, NOTIFIER
from notification_service.mailer import Mailer
from notification_service.messages import message_id
from notification_service.notifier import Notifier, Outcome
from notification_service.settings import Settings, SmtpSettings


async def test_a_stale_claim_is_sent_again_with_the_same_message_id(
    service: Any, broker: Broker, smtp: SmtpSink, pool: aiopg.Pool
) -> None:
    # What a crash between the SMTP server's 250 and our "sent" record
    # leaves behind: a claim older than its lease. It is resent, and the
    # copy carries the first attempt's Message-ID.
    user = new_user()
    event = verification_requested(user)
    await _insert_claim(pool, event.id, "verify_email", user, claimed_ago="10 minutes")
    await broker.publish(event)

    [message] = await eventually(lambda: smtp.to(user["email"]), within=10, what="the resend")
    assert message["Message-ID"] == f"<{uuid.UUID(event.id).hex}.verify_email@todo-mesh.test>"
    # Recorded once the SMTP server's answer is back, a moment after the sink has the message.
    sent = [(event.id, "verify_email", "sent")]
    await eventually(lambda: _rows_are(pool, sent), within=5, what="the claim marked sent")


async def test_an_event_claimed_by_a_live_delivery_waits_for_it_instead_of_sending(
    service: Any, broker: Broker, smtp: SmtpSink, pool: aiopg.Pool
) -> None:
    user = new_user()
    event = verification_requested(user)
    await _insert_claim(pool, event.id, "verify_email", user, claimed_ago="1 second")
    await broker.publish(event)

    consumer = service.app[CONSUMER]
    await eventually(lambda: consumer.settled["retried"] >= 1, within=10, what="a retry")
    async with pool.acquire() as conn, conn.cursor() as cur:  # the other delivery finishes
        await cur.execute("UPDATE notifications SET status = 'sent', sent_at = now()")
    await eventually(lambda: consumer.settled["acked"] == 1, within=10, what="the retried event acked")
    assert smtp.received == []


async def test_an_email_whose_250_never_came_keeps_its_claim_and_is_not_sent_again_within_the_lease(
    settings: Settings, start_service: StartService, broker: Broker, smtp: SmtpSink, pool: aiopg.Pool
) -> None:
    smtp.data_delay = 2.0  # the server has the message, and answers after we gave up
    service = await start_service(smtp=replace(settings.smtp, data_timeout=0.3))
    event = verification_requested(new_user())
    published = time.monotonic()
    await broker.publish(event)

    # Retried later, through the 1 s then the 5 s retry queue: each time the
    # claim is found held, so nothing is sent again, as long as the lease
    # (longer than a send can take) has not run out.
    consumer = service.app[CONSUMER]
    await eventually(lambda: consumer.settled["retried"] >= 3, within=15, what="three retries")
    assert time.monotonic() - published < service.app[NOTIFIER].lease
    assert len(smtp.received) == 1
    assert await notification_rows(pool) == [(event.id, "verify_email", "sending")]  # the claim is kept


async def test_a_claim_taken_over_after_its_lease_cannot_be_released_by_its_former_holder(pool: aiopg.Pool) -> None:
    user = new_user()
    event_id = verification_requested(user).id
    claim = Claim(
        event_id, "verify_email", user["id"], user["email"], "Confirm", message_id(event_id, "verify_email", MAIL_FROM)
    )
    first = await claim_notification(pool, claim, lease=60)
    assert first is not None
    assert await claim_notification(pool, claim, lease=60) is None  # held
    second = await claim_notification(pool, claim, lease=0)  # its lease has run out: taken over
    assert second is not None and second != first

    await release_notification(pool, event_id, "verify_email", first)  # the former holder gives up, late
    assert await notification_rows(pool) == [(event_id, "verify_email", "sending")]  # still the new holder's
    await release_notification(pool, event_id, "verify_email", second)
    assert await notification_rows(pool) == []


async def _insert_claim(pool: aiopg.Pool, event_id: str, kind: str, user: dict[str, str], *, claimed_ago: str) -> None:
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "INSERT INTO notifications (event_id, kind, user_id, recipient, subject, message_id, status, claimed_at)"
            " VALUES (%s, %s, %s, %s, 'Confirm', %s, 'sending', now() - %s::interval)",
            (event_id, kind, user["id"], user["email"], message_id(event_id, kind, MAIL_FROM), claimed_ago),
        )


async def _rows_are(pool: aiopg.Pool, expected: list[tuple[str, str, str]]) -> bool:
    return await notification_rows(pool) == expected


async def test_a_claim_is_taken_only_once_an_smtp_session_is_free(pool: aiopg.Pool, smtp: SmtpSink) -> None:
    # The claim's lease covers one send. Taken while the delivery still waits
    # for a session behind a slow server, it could run out first, and another
    # instance would take the claim over and send the same email.
    smtp.data_gate = asyncio.Event()  # the server holds the first email until the test has looked
    mailer = Mailer(SmtpSettings(host="127.0.0.1", port=smtp.port, mail_from=MAIL_FROM))
    mailer._slots = asyncio.Semaphore(1)  # every session busy but this one
    notifier = Notifier(pool, mailer, None, sender=MAIL_FROM)  # type: ignore[arg-type]
    first = asyncio.create_task(verify_email(notifier, str(uuid.uuid4()), new_user()))
    waiting_id = str(uuid.uuid4())
    waiting: asyncio.Task[Outcome] | None = None
    try:
        await eventually(lambda: smtp.received, within=5, what="the first email in DATA, holding the session")
        waiting = asyncio.create_task(verify_email(notifier, waiting_id, new_user()))
        for _ in range(5):
            await asyncio.sleep(0.05)
            assert waiting_id not in {row[0] for row in await notification_rows(pool)}
        smtp.data_gate.set()
        assert (await first, await waiting) == (Outcome.SENT, Outcome.SENT)
    finally:
        smtp.data_gate.set()
        for task in (first, waiting):
            if task is not None and not task.done():
                task.cancel()
        await mailer.close()


async def test_a_slow_still_wanted_check_leaves_no_claim_for_another_delivery_to_take_over(
    pool: aiopg.Pool, smtp: SmtpSink
) -> None:
    # The lease covers the send. A check that ran inside the claim (its
    # database round trips can take seconds) could outlast the lease, and
    # another delivery of the same reminder take the claim over and send too.
    mailer = Mailer(SmtpSettings(host="127.0.0.1", port=smtp.port, mail_from=MAIL_FROM))
    notifier = Notifier(pool, mailer, None, sender=MAIL_FROM)  # type: ignore[arg-type]
    # The first delivery must claim, send and record in the 1.4 leases
    # between the two checks' ends: a lease of 0.5 s left a busy machine 0.7.
    notifier.lease = 1.5
    user, event_id = new_user(), str(uuid.uuid4())
    checking = asyncio.Event()

    async def slow_check() -> bool:
        checking.set()
        await asyncio.sleep(notifier.lease * 2)
        return True

    try:
        first = asyncio.create_task(verify_email(notifier, event_id, user, still_wanted=slow_check))
        await asyncio.wait_for(checking.wait(), timeout=5)
        await asyncio.sleep(notifier.lease * 1.4)  # the scenario itself: past a lease taken before the check
        second = asyncio.create_task(verify_email(notifier, event_id, user, still_wanted=slow_check))
        outcomes = await asyncio.wait_for(asyncio.gather(first, second), timeout=10)
    finally:
        await mailer.close()

    assert sorted(o.value for o in outcomes) == ["already_sent", "sent"]
    assert len(smtp.received) == 1
