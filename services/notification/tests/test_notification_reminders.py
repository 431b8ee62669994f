"""Reminders follow todo events alone, and each due date is reminded of once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import aiopg
import pytest
from notification_support import MAIL_FROM, Broker, Client, FakeUserService, eventually, new_user, todo_event
from smtp_sink import SmtpSink

from mesh_common.events import Event
from notification_service.events import todo_snapshot
from notification_service.failures import MalformedEvent
from notification_service.keys import CONSUMER
from notification_service.messages import message_id


def todo(
    todo_id: str, title: str, due_in: timedelta | None, *, completed: bool = False, version: int = 1
) -> dict[str, Any]:
    due_at = None if due_in is None else (datetime.now(UTC) + due_in).isoformat()
    return {"id": todo_id, "title": title, "due_at": due_at, "completed": completed, "version": version}


async def reminder_row(pool: aiopg.Pool, todo_id: str) -> dict[str, Any] | None:
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "SELECT title, due_at, cancelled, sent_at IS NOT NULL, event_id::text FROM reminders WHERE todo_id = %s",
            (todo_id,),
        )
        row = await cur.fetchone()
    if row is None:
        return None
    return dict(zip(("title", "due_at", "cancelled", "sent", "event_id"), row, strict=True))


async def test_a_todo_due_within_a_day_gets_one_reminder(
    service: Client, broker: Broker, smtp: SmtpSink, users: FakeUserService, pool: aiopg.Pool
) -> None:
    owner = users.add(new_user())
    created = todo_event("created", owner["id"], todo("t1", "File taxes <today>", timedelta(hours=3)))
    await broker.publish(created)

    [message] = await eventually(lambda: smtp.to(owner["email"]), within=10, what="the reminder")
    assert message["Subject"] == "Due in 3 hours: File taxes <today>"
    assert message["Message-ID"].startswith(f"<{created.id.replace('-', '')}.reminder@")
    plain, rich = message.get_body(preferencelist=("plain",)), message.get_body(preferencelist=("html",))
    assert plain is not None and rich is not None
    assert '"File taxes <today>" is due in 3 hours' in plain.get_content()
    html = rich.get_content()
    assert "<strong>File taxes &lt;today&gt;</strong>" in html
    await eventually(lambda: _sent(pool, "t1"), within=5, what="the reminder recorded as sent")

    # A new title, the same due date: the reminder for that date was sent already.
    await broker.publish(todo_event("updated", owner["id"], {**created.data, "title": "File taxes", "version": 2}))
    await eventually(lambda: service.app[CONSUMER].settled["acked"] == 2, within=10, what="the update applied")
    row = await reminder_row(pool, "t1")
    assert row is not None and (row["title"], row["sent"], row["event_id"]) == ("File taxes", True, created.id)
    assert len(smtp.to(owner["email"])) == 1


async def test_completing_and_deleting_cancel_a_reminder_and_reopening_restores_it(
    service: Client, broker: Broker, users: FakeUserService, pool: aiopg.Pool
) -> None:
    owner = users.add(new_user())
    snapshot = todo("t2", "Renew passport", timedelta(days=3))
    steps = [
        ("created", snapshot, False),
        ("completed", {**snapshot, "completed": True, "version": 2}, True),
        ("reopened", {**snapshot, "version": 3}, False),
        # A deletion carries the todo as it was: the version of the last change.
        ("deleted", {**snapshot, "version": 3}, True),
    ]
    consumer = service.app[CONSUMER]
    for n, (kind, data, cancelled) in enumerate(steps, start=1):
        await broker.publish(todo_event(kind, owner["id"], data))

        def applied(n: int = n) -> bool:
            return consumer.settled["acked"] == n

        await eventually(applied, within=10, what=f"todo.{kind} applied")
        row = await reminder_row(pool, "t2")
        assert row is not None and (row["cancelled"], row["sent"]) == (cancelled, False), kind


async def test_a_new_due_date_is_a_new_reminder(
    service: Client, broker: Broker, smtp: SmtpSink, users: FakeUserService, pool: aiopg.Pool
) -> None:
    owner = users.add(new_user())
    await broker.publish(todo_event("created", owner["id"], todo("t3", "Call the bank", timedelta(hours=1))))
    await eventually(lambda: smtp.to(owner["email"]), within=10, what="the first reminder")

    moved = todo_event("updated", owner["id"], todo("t3", "Call the bank", timedelta(hours=2), version=2))
    await broker.publish(moved)
    messages = await eventually(lambda: smtp.to(owner["email"]) if len(smtp.to(owner["email"])) == 2 else [],
                                within=10, what="a reminder for the new date")  # fmt: skip
    assert [m["Subject"] for m in messages] == ["Due in 60 minutes: Call the bank", "Due in 2 hours: Call the bank"]
    await eventually(lambda: _sent(pool, "t3"), within=5, what="the new reminder recorded as sent")
    row = await reminder_row(pool, "t3")
    assert row is not None and row["event_id"] == moved.id


async def test_events_apply_in_the_order_of_the_todos_versions_not_of_their_clocks(
    service: Client, broker: Broker, users: FakeUserService, pool: aiopg.Pool
) -> None:
    # Two todo-service instances whose clocks disagree: occurred_at says the
    # second change came first. data.version says what really happened.
    owner = users.add(new_user())
    now = datetime.now(UTC)
    early_clock = (now - timedelta(minutes=1)).isoformat()
    created = todo_event("created", owner["id"], todo("t4", "First", timedelta(days=9)), occurred_at=now.isoformat())
    updated = todo_event(
        "updated", owner["id"], todo("t4", "Second", timedelta(days=5), version=2), occurred_at=early_clock
    )
    deleted = todo_event("deleted", owner["id"], {**updated.data}, occurred_at=early_clock)
    consumer = service.app[CONSUMER]

    async def apply(event: Event, n: int) -> dict[str, Any] | None:
        await broker.publish(event)
        await eventually(lambda: consumer.settled["acked"] == n, within=10, what=f"{event.type} handled")
        return await reminder_row(pool, "t4")

    assert (await apply(created, 1) or {}).get("title") == "First"
    row = await apply(updated, 2)
    assert row is not None and (row["title"], row["event_id"]) == ("Second", updated.id)
    # A redelivery of an older version (a retry, a replay) changes nothing.
    row = await apply(created, 3)
    assert row is not None and (row["title"], row["event_id"]) == ("Second", updated.id)
    # The deletion carries the version of the change before it, and still wins.
    row = await apply(deleted, 4)
    assert row is not None and row["cancelled"] is True
    # The change before it, redelivered, does not bring the reminder back.
    row = await apply(updated, 5)
    assert row is not None and row["cancelled"] is True


async def test_an_overdue_todo_gets_no_reminder(
    service: Client, broker: Broker, smtp: SmtpSink, users: FakeUserService, pool: aiopg.Pool
) -> None:
    owner = users.add(new_user())
    await broker.publish(todo_event("created", owner["id"], todo("t5", "Too late", timedelta(hours=-1))))
    await broker.publish(todo_event("created", owner["id"], todo("t6", "In time", timedelta(hours=1))))

    # Reminders go out in remind_at order, so the overdue one would come first.
    await eventually(lambda: smtp.to(owner["email"]), within=10, what="the reminder due in time")
    assert [m["Subject"] for m in smtp.to(owner["email"])] == ["Due in 60 minutes: In time"]
    row = await reminder_row(pool, "t5")
    assert row is not None and row["sent"] is False


async def test_a_due_date_at_the_start_of_the_calendar_is_handled_not_dead_lettered(
    service: Client, broker: Broker, users: FakeUserService, pool: aiopg.Pool
) -> None:
    # A day's lead before 0001-01-01T12:00 is before the first date Python
    # knows: the subtraction overflowed, and every later event of the todo
    # (its completion too) went to the DLQ while the old reminder stayed.
    owner = users.add(new_user())
    early = {"id": "t7", "title": "Ancient", "due_at": "0001-01-01T12:00:00+00:00", "completed": False, "version": 1}
    consumer = service.app[CONSUMER]
    await broker.publish(todo_event("created", owner["id"], early))
    await eventually(lambda: consumer.settled["acked"] == 1, within=10, what="the creation handled")
    await broker.publish(todo_event("completed", owner["id"], {**early, "completed": True, "version": 2}))
    await eventually(lambda: consumer.settled["acked"] == 2, within=10, what="the completion handled")
    assert consumer.settled["dead_lettered"] == 0
    row = await reminder_row(pool, "t7")
    assert row is not None and row["cancelled"] is True and row["sent"] is False


async def _sent(pool: aiopg.Pool, todo_id: str) -> bool:
    row = await reminder_row(pool, todo_id)
    return row is not None and row["sent"]


async def test_a_reminder_goes_out_when_its_time_comes_not_before(
    service: Client, broker: Broker, smtp: SmtpSink, users: FakeUserService, pool: aiopg.Pool
) -> None:
    owner = users.add(new_user())
    # Due a day and five seconds from now: the reminder is due in five seconds,
    # time enough, even on a busy machine, to see that it has not gone yet.
    await broker.publish(todo_event("created", owner["id"], todo("t7", "Board meeting", timedelta(days=1, seconds=5))))
    await eventually(lambda: service.app[CONSUMER].settled["acked"] == 1, within=10, what="the todo applied")
    row = await reminder_row(pool, "t7")
    assert row is not None and (row["cancelled"], row["sent"]) == (False, False)
    assert smtp.to(owner["email"]) == []

    [message] = await eventually(lambda: smtp.to(owner["email"]), within=10, what="the reminder at its time")
    assert message["Subject"] == "Due in 24 hours: Board meeting"


async def test_a_reminder_held_by_another_delivery_does_not_hold_up_the_ones_behind_it(
    service: Client, broker: Broker, smtp: SmtpSink, users: FakeUserService, pool: aiopg.Pool
) -> None:
    owner = users.add(new_user())
    # Due in two and three seconds' reminding time: the held one comes first in line.
    held = todo_event("created", owner["id"], todo("h1", "Held", timedelta(days=1, seconds=2)))
    free = todo_event("created", owner["id"], todo("h2", "Free", timedelta(days=1, seconds=3)))
    # As if another instance were sending the first one right now (its lease
    # is long). Claimed before the events arrive, so that it is held whenever
    # its time comes, however slow this machine is.
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "INSERT INTO notifications (event_id, kind, user_id, recipient, subject, message_id, status, claimed_at)"
            " VALUES (%s, 'reminder', %s, %s, 'Held', %s, 'sending', now())",
            (held.id, owner["id"], owner["email"], message_id(held.id, "reminder", MAIL_FROM)),
        )
    for event in (held, free):
        await broker.publish(event)
    await eventually(lambda: service.app[CONSUMER].settled["acked"] == 2, within=10, what="both todos applied")

    [message] = await eventually(lambda: smtp.to(owner["email"]), within=10, what="the reminder behind the held one")
    assert message["Subject"] == "Due in 24 hours: Free"
    assert not await _sent(pool, "h1")


async def test_a_reminder_failing_for_a_reason_of_its_own_does_not_hold_up_the_ones_behind_it(
    service: Client, broker: Broker, smtp: SmtpSink, users: FakeUserService, pool: aiopg.Pool
) -> None:
    unlucky, lucky = users.add(new_user()), users.add(new_user())
    smtp.refuse[unlucky["email"]] = "452 4.2.2 Mailbox full"  # for now: a reason to try again later
    # Both due at once; the unlucky one first in line, and tried first.
    await broker.publish(todo_event("created", unlucky["id"], todo("f1", "First", timedelta(hours=2))))
    await eventually(lambda: unlucky["email"] in smtp.attempts, within=10, what="the first reminder tried")
    await broker.publish(todo_event("created", lucky["id"], todo("f2", "Second", timedelta(hours=3))))

    [message] = await eventually(lambda: smtp.to(lucky["email"]), within=15, what="the reminder behind the failing one")
    assert message["Subject"] == "Due in 3 hours: Second"
    assert not smtp.to(unlucky["email"])
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT retry_at > now(), sent_at FROM reminders WHERE todo_id = 'f1'")
        assert await cur.fetchone() == (True, None)  # tried again later, not given up on


@pytest.mark.parametrize("version", [None, 0, -1, "2", 2.0, True])
def test_a_todo_event_without_a_usable_version_is_refused(version: object) -> None:
    data = {**todo("t9", "Unordered", timedelta(days=1)), "version": version}
    if version is None:
        del data["version"]
    event = Event(type="todo.updated", user_id="u", data=data, correlation_id="c")
    with pytest.raises(MalformedEvent, match=r"data\.version"):
        todo_snapshot(event)
