"""Email verification: an address gets nothing but its code until its owner proves they read it."""

from __future__ import annotations

import uuid
from collections.abc import MutableMapping
from datetime import timedelta
from typing import Any

import aiopg
import pytest
from direct_sends import notification_rows
from notification_support import (
    Broker,
    Client,
    FakeUserService,
    eventually,
    new_user,
    registered,
    todo_event,
    verification_requested,
)
from smtp_sink import SmtpSink
from structlog.testing import capture_logs
from test_notification_reminders import reminder_row, todo

from notification_service.events import EventHandler
from notification_service.failures import MalformedEvent
from notification_service.keys import CONSUMER


def skipped(logs: list[MutableMapping[str, Any]], reason: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == "notification_skipped" and e.get("reason") == reason]


async def test_the_code_goes_once_to_the_address_in_the_event_however_often_delivered(
    service: Client, broker: Broker, smtp: SmtpSink, users: FakeUserService, pool: aiopg.Pool
) -> None:
    # Not a user the user-service knows as verified, nor at all: the code goes
    # to the address being proven, which is the event's.
    user = new_user()
    event = verification_requested(user, reason="email_changed")
    token = event.data["token"]
    with capture_logs() as logs:
        for _ in range(3):
            await broker.publish(event)
        consumer = service.app[CONSUMER]
        await eventually(lambda: consumer.settled["acked"] == 3, within=15, what="every copy acked")

    [message] = smtp.to(user["email"])
    assert len(smtp.received) == 1
    assert message["Message-ID"] == f"<{uuid.UUID(event.id).hex}.verify_email@todo-mesh.test>"
    plain = message.get_body(preferencelist=("plain",))
    assert plain is not None
    text = plain.get_content()
    assert f"Code: {token}" in text.splitlines()  # a line of its own: what a reader (or a script) greps for
    assert "was changed to this one" in text
    assert "POST /api/v1/auth/verify-email" in text and '{"token": ' in text
    assert "If this was not you, ignore this email." in text
    assert users.user_requests == 0  # no lookup: the address is in the event
    assert await notification_rows(pool) == [(event.id, "verify_email", "sent")]
    assert token not in repr(logs)  # the code is a secret: never logged


async def test_an_expired_code_is_not_sent_and_its_event_is_acked(
    service: Client, broker: Broker, smtp: SmtpSink, pool: aiopg.Pool
) -> None:
    user = new_user()
    with capture_logs() as logs:
        await broker.publish(verification_requested(user, expires_in=-1.0))
        consumer = service.app[CONSUMER]
        await eventually(lambda: consumer.settled["acked"] == 1, within=10, what="the event acked")

    assert smtp.received == []
    assert await notification_rows(pool) == []
    assert len(skipped(logs, "expired")) == 1
    assert consumer.settled["dead_lettered"] == consumer.settled["retried"] == 0


async def test_registering_sends_nothing_of_its_own_and_is_acked(
    service: Client, broker: Broker, smtp: SmtpSink, pool: aiopg.Pool
) -> None:
    await broker.publish(registered(new_user()))  # the verification email is the welcome now

    consumer = service.app[CONSUMER]
    await eventually(lambda: consumer.settled["acked"] == 1, within=10, what="the event acked")
    assert smtp.received == []
    assert await notification_rows(pool) == []
    assert await broker.ready(broker.topology.dead_letters) == 0


@pytest.mark.parametrize(("verified", "sent"), [(True, True), (False, False), (None, False)])
async def test_a_completed_todo_is_emailed_only_to_a_verified_address(
    service: Client,
    broker: Broker,
    smtp: SmtpSink,
    users: FakeUserService,
    pool: aiopg.Pool,
    verified: bool | None,
    sent: bool,
) -> None:
    # None: a profile without the flag (a user-service not yet upgraded) blocks rather than leaks.
    owner = users.add(new_user(), verified=verified)
    event = todo_event("completed", owner["id"], {"id": "t1", "title": "Ship it", "completed": True})
    with capture_logs() as logs:
        await broker.publish(event)
        consumer = service.app[CONSUMER]
        await eventually(lambda: consumer.settled["acked"] == 1, within=10, what="the event acked")

    if sent:
        [message] = smtp.to(owner["email"])
        assert message["Subject"] == "Done: Ship it"
        assert await notification_rows(pool) == [(event.id, "todo_completed", "sent")]
    else:
        assert smtp.received == []
        assert await notification_rows(pool) == []  # nothing claimed
        assert [e["event_id"] for e in skipped(logs, "unverified")] == [event.id]
    assert consumer.settled["dead_lettered"] == consumer.settled["retried"] == 0


async def test_a_reminder_due_for_an_unverified_address_is_done_with_not_sent_or_deferred(
    service: Client, broker: Broker, smtp: SmtpSink, users: FakeUserService, pool: aiopg.Pool
) -> None:
    owner = users.add(new_user(), verified=False)
    with capture_logs() as logs:
        await broker.publish(todo_event("created", owner["id"], todo("t1", "File taxes", timedelta(hours=3))))

        async def done_with() -> bool:
            row = await reminder_row(pool, "t1")
            return row is not None and row["sent"]

        await eventually(done_with, within=10, what="the reminder done with")

    assert smtp.received == []
    assert await notification_rows(pool) == []
    assert len(skipped(logs, "unverified")) == 1
    assert not [e for e in logs if e["event"] in {"reminder_deferred", "reminders_round_failed"}]


async def test_the_verification_event_is_routed_to_our_queue(broker: Broker) -> None:
    # No service consuming: the message waits in the queue the binding routes it to.
    await broker.publish(verification_requested(new_user()))
    await eventually(lambda: broker.ready(broker.topology.queue), within=10, what="the event in our queue")


@pytest.mark.parametrize(
    "token", ["abc\nCode: forged", "a b", "x" * 201, "<b>"], ids=["newline", "space", "too-long", "markup"]
)
async def test_a_code_that_is_not_a_url_safe_token_is_malformed_and_not_echoed(token: str) -> None:
    # On a line of its own in the email: a newline would let an event add lines of its own.
    user = new_user()
    handler = EventHandler(None, None, retention=3600)  # type: ignore[arg-type]  # refused before either is used
    with pytest.raises(MalformedEvent) as refused:
        await handler.handle(verification_requested(user, token=token))
    assert token not in str(refused.value)


@pytest.mark.parametrize(
    "expires_at", ["9999-12-31T23:59:59-01:00", "tomorrow"], ids=["past-year-9999-in-utc", "no-date"]
)
async def test_an_expiry_that_is_no_instant_in_utc_is_malformed(expires_at: str) -> None:
    # Not an error to retry: the same event fails the same way every time.
    handler = EventHandler(None, None, retention=3600)  # type: ignore[arg-type]  # refused before either is used
    event = verification_requested(new_user())
    event.data["expires_at"] = expires_at
    with pytest.raises(MalformedEvent, match=r"data\.expires_at"):
        await handler.handle(event)
