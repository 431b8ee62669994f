"""Events become emails, once each, however often they are delivered."""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

import aiohttp
import aiopg
import pytest
from direct_sends import notification_rows
from notification_support import (
    MAIL_FROM,
    SECRET,
    Broker,
    Client,
    FakeUserService,
    StartService,
    eventually,
    new_user,
    todo_event,
    verification_requested,
)
from smtp_sink import SmtpSink

from devstack.config import StackConfig
from notification_service.keys import CONSUMER
from notification_service.settings import Settings


async def shared_sink_messages(infra: StackConfig, recipients: set[str]) -> list[dict[str, Any]]:
    """Messages in the stack's SMTP sink addressed to ``recipients`` (the sink is shared)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{infra.mail_api_url}/api/v1/messages", params={"limit": "5000"}) as resp,
    ):
        body = await resp.json()
    return [m for m in body["messages"] if {to["Address"] for to in m["To"]} & recipients]


async def test_each_event_delivered_three_times_sends_one_email(
    infra: StackConfig, settings: Settings, start_service: StartService, broker: Broker, users: FakeUserService
) -> None:
    # Through the stack's own SMTP sink and its Mailpit-compatible API.
    client = await start_service(smtp=replace(settings.smtp, port=infra.ports.smtp))
    owner = users.add(new_user())
    newcomers = [new_user() for _ in range(3)]
    events = [verification_requested(u) for u in newcomers] + [
        todo_event("completed", owner["id"], {"id": f"todo-{n}", "title": f"Task {n}", "completed": True})
        for n in range(3)
    ]
    for _ in range(3):
        for event in events:
            await broker.publish(event)

    consumer = client.app[CONSUMER]
    await eventually(lambda: consumer.settled["acked"] == 3 * len(events), within=30, what="every copy acked")

    recipients = {u["email"] for u in newcomers} | {owner["email"]}
    messages = await shared_sink_messages(infra, recipients)
    by_message_id = sorted(m["MessageID"] for m in messages)
    expected = sorted(
        [f"<{uuid.UUID(e.id).hex}.verify_email@todo-mesh.test>" for e in events[:3]]
        + [f"<{uuid.UUID(e.id).hex}.todo_completed@todo-mesh.test>" for e in events[3:]]
    )
    assert by_message_id == expected  # one email per event: duplicates 0, lost 0


async def test_verification_email_has_a_text_and_an_escaped_html_part(
    service: Any, broker: Broker, smtp: SmtpSink
) -> None:
    user = new_user()
    user["display_name"] = "Ada <b>Lovelace</b>"
    event = verification_requested(user)
    await broker.publish(event)

    [message] = await eventually(lambda: smtp.to(user["email"]), within=10, what="the verification email")
    assert message["Subject"] == "Confirm your email address for todo-mesh"
    assert message["From"] == MAIL_FROM
    assert message["To"].addresses[0].addr_spec == user["email"]
    assert message["Message-ID"] == f"<{uuid.UUID(event.id).hex}.verify_email@todo-mesh.test>"
    assert message["Auto-Submitted"] == "auto-generated"
    plain, rich = message.get_body(preferencelist=("plain",)), message.get_body(preferencelist=("html",))
    assert plain is not None and rich is not None
    text = plain.get_content()
    html = rich.get_content()
    assert f'Welcome to todo-mesh! Your account "{user["username"]}" is ready' in text
    assert f"Code: <code>{event.data['token']}</code>" in html
    assert "Hi Ada <b>Lovelace</b>," in text
    assert "Hi Ada &lt;b&gt;Lovelace&lt;/b&gt;," in html
    assert "<b>Lovelace</b>" not in html


async def test_completed_todo_emails_its_owner_found_through_the_user_service(
    service: Any, broker: Broker, smtp: SmtpSink, users: FakeUserService
) -> None:
    owner = users.add(new_user())
    events = [
        todo_event("completed", owner["id"], {"id": f"t{n}", "title": f"Write chapter {n}", "completed": True})
        for n in range(5)
    ]
    for event in events:
        await broker.publish(event)

    messages = await eventually(
        lambda: smtp.to(owner["email"]) if len(smtp.to(owner["email"])) == 5 else [], within=10, what="5 notices"
    )
    assert sorted(m["Subject"] for m in messages) == [f"Done: Write chapter {n}" for n in range(5)]
    assert not messages[0].is_multipart()  # a one-line notice needs no HTML part
    # One service token for all five lookups: it is cached until shortly before it expires.
    assert users.token_requests == 1
    assert users.user_requests == 5


async def test_a_refused_service_token_is_replaced_once(
    service: Any, broker: Broker, smtp: SmtpSink, users: FakeUserService
) -> None:
    owner = users.add(new_user())
    await broker.publish(todo_event("completed", owner["id"], {"id": "a", "title": "First", "completed": True}))
    await eventually(lambda: smtp.to(owner["email"]), within=10, what="the first notice")
    users.revoke_tokens()  # as after a restart of the user-service with new keys

    await broker.publish(todo_event("completed", owner["id"], {"id": "b", "title": "Second", "completed": True}))
    await eventually(lambda: len(smtp.to(owner["email"])) == 2, within=10, what="the second notice")
    assert users.token_requests == 2


async def test_a_refused_client_secret_keeps_the_events_until_it_is_fixed(
    service: Client, broker: Broker, smtp: SmtpSink, users: FakeUserService
) -> None:
    owner = users.add(new_user())
    users.secret = "rotated-on-the-user-service-only"
    await broker.publish(todo_event("completed", owner["id"], {"id": "a", "title": "Kept", "completed": True}))

    consumer = service.app[CONSUMER]
    await eventually(lambda: consumer.settled["retried"] >= 1, within=10, what="a retry")
    users.secret = SECRET  # the configuration is put right
    await eventually(lambda: smtp.to(owner["email"]), within=15, what="the email once the secret matches")
    assert consumer.settled["dead_lettered"] == 0


async def test_an_empty_answer_about_a_user_is_retried_not_taken_for_an_unknown_user(
    service: Client, broker: Broker, smtp: SmtpSink, users: FakeUserService
) -> None:
    owner = users.add(new_user())
    users.answer_empty = True
    await broker.publish(todo_event("completed", owner["id"], {"id": "a", "title": "Kept", "completed": True}))

    consumer = service.app[CONSUMER]
    await eventually(lambda: consumer.settled["retried"] >= 1, within=10, what="a retry")
    assert consumer.settled["acked"] == 0  # not skipped as if the user were gone
    users.answer_empty = False
    await eventually(lambda: smtp.to(owner["email"]), within=15, what="the email once the answers are whole")


@pytest.mark.parametrize(
    "body",
    ['{"code": "NOT_FOUND", "status": 404, "title": "Not found"}', "404 page not found"],
    ids=["another problem", "a proxy's page"],
)
async def test_a_404_that_is_not_about_the_user_is_retried_not_taken_for_an_unknown_user(
    service: Client, broker: Broker, smtp: SmtpSink, users: FakeUserService, body: str
) -> None:
    owner = users.add(new_user())
    users.other_404 = body
    await broker.publish(todo_event("completed", owner["id"], {"id": "b", "title": "Kept", "completed": True}))

    consumer = service.app[CONSUMER]
    await eventually(lambda: consumer.settled["retried"] >= 1, within=10, what="a retry")
    assert consumer.settled["acked"] == 0  # not skipped as if the user were gone
    users.other_404 = None
    await eventually(lambda: smtp.to(owner["email"]), within=15, what="the email once the user-service answers")


async def test_an_event_for_an_unknown_user_is_acked_without_email(
    service: Any, broker: Broker, smtp: SmtpSink, pool: aiopg.Pool
) -> None:
    event = todo_event("completed", new_user()["id"], {"id": "x", "title": "Orphan", "completed": True})
    await broker.publish(event)

    consumer = service.app[CONSUMER]
    await eventually(lambda: consumer.settled["acked"] == 1, within=10, what="the event acked")
    assert smtp.received == []
    assert await notification_rows(pool) == []
