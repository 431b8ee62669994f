"""Events are remembered for the retention: older ones are refused, and what guarded them is pruned."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aiopg
from notification_support import Broker, Client, FakeUserService, eventually, new_user, todo_event
from smtp_sink import SmtpSink

from mesh_common.pruning import PruneSettings, prune
from notification_service.keys import CONSUMER
from notification_service.retention import CLOCK_MARGIN, prune_jobs

DAY = timedelta(days=1)
RETENTION = 30 * DAY
# Just older than what the pruner keeps, and just younger.
PRUNABLE = RETENTION + timedelta(seconds=CLOCK_MARGIN) + timedelta(hours=1)
KEPT = RETENTION + timedelta(seconds=CLOCK_MARGIN) - timedelta(hours=1)


async def add_notification(pool: aiopg.Pool, age: timedelta, status: str) -> str:
    event_id = str(uuid.uuid4())
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "INSERT INTO notifications (event_id, kind, user_id, recipient, subject, message_id, status,"
            " claimed_at, sent_at) VALUES (%s, 'welcome', 'u', 'a@example.test', 's', 'm', %s, %s, %s)",
            (event_id, status, datetime.now(UTC) - age, None if status == "sending" else datetime.now(UTC) - age),
        )
    return event_id


async def add_reminder(
    pool: aiopg.Pool, age: timedelta, *, due_in: timedelta | None, deleted: bool = False, cancelled: bool = False
) -> str:
    todo_id = f"t-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    due_at = None if due_in is None else now + due_in
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "INSERT INTO reminders (todo_id, user_id, title, due_at, remind_at, event_id, event_at, cancelled,"
            " todo_version, todo_deleted) VALUES (%s, 'u', 'T', %s, %s, %s, %s, %s, 3, %s)",
            (todo_id, due_at, due_at and due_at - DAY, str(uuid.uuid4()), now - age, cancelled, deleted),
        )
    return todo_id


async def remaining(pool: aiopg.Pool, table: str, column: str) -> set[str]:
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(f"SELECT {column}::text FROM {table}")
        return {row[0] for row in await cur.fetchall()}


async def test_the_pruner_forgets_only_what_no_event_can_need_any_more(pool: aiopg.Pool) -> None:
    old_sent = [await add_notification(pool, PRUNABLE, "sent") for _ in range(5)]
    old_claim = await add_notification(pool, PRUNABLE, "sending")  # its event was dead-lettered long ago
    young = await add_notification(pool, KEPT, "sent")

    gone = [
        await add_reminder(pool, PRUNABLE, due_in=None, deleted=True),  # a deleted todo's tombstone
        await add_reminder(pool, PRUNABLE, due_in=None),  # no due date: nothing to remind of
        await add_reminder(pool, PRUNABLE, due_in=-RETENTION * 2),  # sent or missed, long ago
        await add_reminder(pool, PRUNABLE, due_in=-RETENTION * 2, cancelled=True),
    ]
    kept = [
        await add_reminder(pool, KEPT, due_in=None, deleted=True),  # a late event may still need it
        await add_reminder(pool, PRUNABLE, due_in=DAY * 3),  # still to be sent
        # Completed, due ahead: reopening it must not send a reminder that went out already.
        await add_reminder(pool, PRUNABLE, due_in=DAY * 3, cancelled=True),
        await add_reminder(pool, PRUNABLE, due_in=-DAY),  # due a day ago: within the retention
    ]

    notifications, reminders = prune_jobs(int(RETENTION.total_seconds()))
    # Batches of 2: a job goes on until a batch comes back short.
    assert (await prune(pool, notifications, batch_size=2)).rows == 6
    assert (await prune(pool, reminders, batch_size=2)).rows == 4
    assert await remaining(pool, "notifications", "event_id") == {young}
    assert not {*old_sent, old_claim} & await remaining(pool, "notifications", "event_id")
    assert await remaining(pool, "reminders", "todo_id") == set(kept)
    assert not set(gone) & await remaining(pool, "reminders", "todo_id")
    # Nothing left to do: a second round deletes nothing.
    assert [(await prune(pool, job, batch_size=100)).rows for job in (notifications, reminders)] == [0, 0]


async def test_the_running_service_prunes(start_service: Any, pool: aiopg.Pool) -> None:
    old = await add_notification(pool, PRUNABLE, "sent")
    young = await add_notification(pool, KEPT, "sent")
    await start_service(retention=int(RETENTION.total_seconds()), prune=PruneSettings(interval=0.2))

    async def pruned() -> bool:
        return old not in await remaining(pool, "notifications", "event_id")

    await eventually(pruned, within=10, what="the old notification pruned")
    assert young in await remaining(pool, "notifications", "event_id")


async def test_an_event_older_than_the_retention_is_dead_lettered_and_changes_nothing(
    service: Client, broker: Broker, smtp: SmtpSink, users: FakeUserService, pool: aiopg.Pool
) -> None:
    owner = users.add(new_user())
    long_ago = (datetime.now(UTC) - RETENTION - DAY).isoformat()
    due = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
    todo = {"id": "t-expired", "title": "Old", "due_at": due, "completed": True, "version": 4}
    await broker.publish(todo_event("completed", owner["id"], todo, occurred_at=long_ago))
    fresh = {"id": "t-fresh", "title": "New", "due_at": None, "completed": True, "version": 1}
    await broker.publish(todo_event("completed", owner["id"], fresh))

    consumer = service.app[CONSUMER]
    await eventually(lambda: consumer.settled["acked"] == 1, within=10, what="the fresh event handled")
    await eventually(lambda: consumer.settled["dead_lettered"] == 1, within=10, what="the old one dead-lettered")
    assert [m["Subject"] for m in smtp.to(owner["email"])] == ["Done: New"]
    assert await remaining(pool, "reminders", "todo_id") == {"t-fresh"}
