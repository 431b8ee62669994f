"""A changed password or address is told to the owner, once, at their verified address, whatever else they were sent."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import aiopg
import pytest
from direct_sends import notification_rows, verify_email
from notification_support import (
    MAIL_FROM,
    Broker,
    Client,
    FakeUserService,
    StartService,
    eventually,
    new_user,
    security_notice,
)
from smtp_sink import SmtpSink
from test_notification_recipient_cap import LIMIT, statuses, use_up_the_hour

from notification_service import recipient_cap
from notification_service.directory import Recipient
from notification_service.events import EventHandler
from notification_service.failures import MalformedEvent
from notification_service.keys import CONSUMER
from notification_service.mailer import Mailer
from notification_service.notifier import Notifier, Outcome
from notification_service.settings import Settings, SmtpSettings

# Each event, the subject of its email and a line only its email has.
NOTICES = {
    "user.password_changed": (
        "Your todo-mesh password was changed",
        "every device signed in to the account was signed out. If this was you",
    ),
    "user.email_changed": (
        "Your todo-mesh email address was changed",
        "from this one to another. If this was you",
    ),
}
EVENT_TYPES = pytest.mark.parametrize("event_type", NOTICES)


@EVENT_TYPES
async def test_the_owner_is_told_once_however_often_the_event_is_delivered(
    event_type: str, service: Client, broker: Broker, smtp: SmtpSink, users: FakeUserService, pool: aiopg.Pool
) -> None:
    owner = new_user()
    event = security_notice(event_type, owner)
    kind = event_type.removeprefix("user.")
    subject, only_its_own = NOTICES[event_type]
    # Whoever made the change has set an address of their own since: the
    # notice goes to the one the account had at the change.
    users.add({**owner, "email": "taker@example.test"})
    for _ in range(3):
        await broker.publish(event)
    consumer = service.app[CONSUMER]
    await eventually(lambda: consumer.settled["acked"] == 3, within=15, what="every copy acked")

    assert len(smtp.received) == 1
    [message] = smtp.to(owner["email"])
    assert users.user_requests == 0  # the address is in the event
    assert message["To"] == f"{owner['display_name']} <{owner['email']}>"
    assert message["Subject"] == subject
    assert message["Message-ID"] == f"<{uuid.UUID(event.id).hex}.{kind}@todo-mesh.test>"
    plain = message.get_body(preferencelist=("plain",))
    assert plain is not None
    text = " ".join(plain.get_content().split())
    when = datetime.fromisoformat(event.occurred_at).astimezone(UTC).strftime("%a %d %b %Y, %H:%M UTC")
    assert f"Hi {owner['display_name']}," in text
    assert f'account "{owner["username"]}" was changed on {when}' in text
    assert only_its_own in text
    assert "If it was not, someone else" in text
    assert await notification_rows(pool) == [(event.id, kind, "sent")]
    # (Copies that came while the first was being sent were retried later, as any event's.)
    assert consumer.settled["dead_lettered"] == 0


@EVENT_TYPES
async def test_an_address_unverified_at_the_change_is_not_told(
    event_type: str, service: Client, broker: Broker, smtp: SmtpSink, users: FakeUserService, pool: aiopg.Pool
) -> None:
    # It may be anyone's: the rule for every email but the code holds for this
    # one too, whatever the profile says of the address by the time it is handled.
    owner = users.add(new_user(), verified=True)
    await broker.publish(security_notice(event_type, owner, verified=False))
    consumer = service.app[CONSUMER]
    await eventually(lambda: consumer.settled["acked"] == 1, within=10, what="the event acked")
    assert smtp.received == []
    assert await notification_rows(pool) == []


@EVENT_TYPES
async def test_while_the_address_is_unverified_the_last_one_proven_is_told(
    event_type: str, service: Client, broker: Broker, smtp: SmtpSink, users: FakeUserService, pool: aiopg.Pool
) -> None:
    # The taker changed the case of the owner's address (unverifying it),
    # then moved the account to theirs, then changed its password: each
    # notice after the first goes to the owner's proven address, not to the
    # unproven one the account had at the change.
    owner = users.add(new_user(), verified=True)
    at_the_change = {**owner, "email": "taker@example.test"}
    event = security_notice(event_type, at_the_change, verified=False, last_verified=owner["email"])
    await broker.publish(event)
    consumer = service.app[CONSUMER]
    await eventually(lambda: consumer.settled["acked"] == 1, within=10, what="the event acked")

    assert len(smtp.received) == 1
    [message] = smtp.to(owner["email"])
    assert message["To"] == f"{owner['display_name']} <{owner['email']}>"
    plain = message.get_body(preferencelist=("plain",))
    assert plain is not None
    text = " ".join(plain.get_content().split())
    assert "because it is the last one the account confirmed" in text
    if event_type == "user.email_changed":
        assert "from one not confirmed to another." in text
    assert await notification_rows(pool) == [(event.id, event_type.removeprefix("user."), "sent")]


@EVENT_TYPES
async def test_todo_notices_that_used_up_the_hour_do_not_hold_the_notice_back(
    event_type: str,
    settings: Settings,
    start_service: StartService,
    broker: Broker,
    smtp: SmtpSink,
    users: FakeUserService,
    pool: aiopg.Pool,
) -> None:
    # Whoever has the password can complete the owner's todos by the dozen:
    # counted against their notices, the one that matters was capped.
    service = await start_service(smtp=replace(settings.smtp, recipient_hourly_limit=LIMIT))
    owner = users.add(new_user())
    await use_up_the_hour(broker, smtp, owner)
    for _ in range(LIMIT + 1):
        await broker.publish(security_notice(event_type, owner))
    consumer = service.app[CONSUMER]
    await eventually(lambda: consumer.settled["acked"] == 2 * LIMIT + 1, within=15, what="every event acked")
    # Counted by their own kind, they are capped at the limit all the same.
    assert await statuses(pool, owner["email"]) == {"sent": 2 * LIMIT, "capped": 1}
    assert len(smtp.to(owner["email"])) == 2 * LIMIT


@EVENT_TYPES
async def test_the_event_is_routed_to_our_queue(event_type: str, broker: Broker) -> None:
    # No service consuming: the message waits in the queue the binding routes it to.
    await broker.publish(security_notice(event_type, new_user()))
    await eventually(lambda: broker.ready(broker.topology.queue), within=10, what="the event in our queue")


@pytest.mark.parametrize("kind", ["password_changed", "email_changed"])
async def test_codes_that_filled_the_mailboxs_hour_do_not_hold_the_notice_back(
    kind: str, pool: aiopg.Pool, smtp: SmtpSink
) -> None:
    # Accounts registered at spellings of the owner's address, each asking for
    # codes, filled the mailbox's ceiling: the owner's notice was capped for good.
    mailer = Mailer(SmtpSettings(host="127.0.0.1", port=smtp.port, mail_from=MAIL_FROM, recipient_hourly_limit=LIMIT))
    notifier = Notifier(pool, mailer, None, sender=MAIL_FROM)  # type: ignore[arg-type]
    owner = new_user()
    local, domain = owner["email"].split("@")
    others = [{**new_user(), "email": f"{local}+{n}@{domain}"} for n in range(recipient_cap.MAILBOX_ACCOUNTS)]
    notice = {"username": owner["username"], "changed_at": "Tue 24 Nov 2026, 12:00 UTC"}
    notice |= {"previous": "this one", "why_here": ""}
    try:
        for other in others:
            for _ in range(LIMIT):
                assert await verify_email(notifier, str(uuid.uuid4()), other) is Outcome.SENT
        assert await verify_email(notifier, str(uuid.uuid4()), owner) is Outcome.CAPPED  # the ceiling is reached
        outcome = await notifier.notify(
            event_id=str(uuid.uuid4()),
            kind=kind,
            user_id=owner["id"],
            values=notice,
            recipient=Recipient(owner["email"], owner["username"], verified=True),
        )
    finally:
        await mailer.close()
    assert outcome is Outcome.SENT


@EVENT_TYPES
@pytest.mark.parametrize("field", ["username", "email"])
async def test_a_notice_without_whom_it_is_for_is_malformed(event_type: str, field: str) -> None:
    handler = EventHandler(None, None, retention=3600)  # type: ignore[arg-type]  # refused before either is used
    event = security_notice(event_type, new_user())
    del event.data[field]
    with pytest.raises(MalformedEvent, match=rf"data\.{field}"):
        await handler.handle(event)


@EVENT_TYPES
@pytest.mark.parametrize("last_verified", ["", 7, ["ada@example.test"]])
async def test_a_last_verified_address_that_is_no_address_is_malformed(event_type: str, last_verified: Any) -> None:
    handler = EventHandler(None, None, retention=3600)  # type: ignore[arg-type]  # refused before either is used
    event = security_notice(event_type, new_user(), verified=False, last_verified=last_verified)
    with pytest.raises(MalformedEvent, match=r"data\.last_verified_email"):
        await handler.handle(event)
