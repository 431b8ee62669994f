"""The reminder scheduler's rounds: what it takes out of the schedule, and when it wakes up next."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aiopg

from notification_service import repository
from notification_service.reminders import Reminders, ReminderScheduler, TodoSnapshot


class NoSends:
    async def notify(self, **_: Any) -> None:
        raise AssertionError("nothing in this schedule is to be sent")


async def pending(pool: aiopg.Pool) -> list[str]:
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT todo_id FROM reminders WHERE sent_at IS NULL AND NOT cancelled ORDER BY todo_id")
        return [row[0] for row in await cur.fetchall()]


async def test_an_overdue_reminder_leaves_the_schedule_and_the_next_one_is_still_found(pool: aiopg.Pool) -> None:
    reminders = Reminders(pool, lead=24 * 3600, wake_window=1, wake=lambda: None)
    now = datetime.now(UTC)
    events: dict[str, str] = {}
    for todo_id, due_in in [
        ("overdue", timedelta(hours=-1)),  # created with a due date in the past: never reminded of
        ("retrying", timedelta(hours=2)),  # due now, but its delivery failed: tried again later
        ("later", timedelta(days=1, hours=1)),  # due to be reminded of in an hour
    ]:
        events[todo_id] = str(uuid.uuid4())
        snapshot = TodoSnapshot(todo_id, "u", todo_id, now + due_in, False, False, 1)
        await reminders.apply(snapshot, event_id=events[todo_id], event_at=now)
    await repository.defer_reminder(pool, "retrying", events["retrying"], 600)
    scheduler = ReminderScheduler(pool, NoSends(), poll_interval=3600)  # type: ignore[arg-type]

    delay = await scheduler._send_due()

    # Left pending, it stayed first in line, and every round walked past it again.
    assert await pending(pool) == ["later", "retrying"]
    assert 590 < delay <= 600  # woken for the retry, the earliest
    await repository.mark_reminder_sent(pool, "retrying", events["retrying"])
    next_at = await repository.next_reminder_at(pool)
    assert next_at is not None and abs((next_at - (now + timedelta(hours=1))).total_seconds()) < 1

    # A new due date for the overdue todo puts it back in the schedule.
    moved = TodoSnapshot("overdue", "u", "overdue", now + timedelta(days=3), False, False, 2)
    await reminders.apply(moved, event_id=str(uuid.uuid4()), event_at=now)
    assert await pending(pool) == ["later", "overdue"]
