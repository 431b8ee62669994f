"""The reminder scheduler's rounds: what it takes out of the schedule and sends, and when it wakes up next."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

import aiopg
import psycopg2
import pytest
from notification_support import MAIL_FROM, eventually
from smtp_sink import SmtpSink
from structlog.testing import capture_logs

from notification_service import reminders as reminders_module
from notification_service import repository
from notification_service.directory import Recipient
from notification_service.failures import ShuttingDown
from notification_service.mailer import SESSIONS, Mailer
from notification_service.notifier import Notifier, Outcome
from notification_service.reminders import Reminders, ReminderScheduler, TodoSnapshot
from notification_service.settings import SmtpSettings


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

    with capture_logs() as logs:
        delay = await scheduler._send_due()

    # Left pending, it stayed first in line, and every round walked past it again.
    assert await pending(pool) == ["later", "retrying"]
    # Never to be reminded of, it was not missed: nothing to warn of.
    assert [e for e in logs if e["event"] == "reminders_given_up"] == []
    assert 590 < delay <= 600  # woken for the retry, the earliest
    await repository.mark_reminder_sent(pool, "retrying", events["retrying"])
    wait = await repository.seconds_to_next_reminder(pool)
    assert wait is not None and abs(wait - (now + timedelta(hours=1) - datetime.now(UTC)).total_seconds()) < 1

    # A new due date for the overdue todo puts it back in the schedule.
    moved = TodoSnapshot("overdue", "u", "overdue", now + timedelta(days=3), False, False, 2)
    await reminders.apply(moved, event_id=str(uuid.uuid4()), event_at=now)
    assert await pending(pool) == ["later", "overdue"]


async def test_a_reminder_kept_from_going_out_until_its_todo_fell_due_is_given_up_aloud(pool: aiopg.Pool) -> None:
    # Deferred past the due date (an outage, the recipient cap), or this
    # service down meanwhile: the reminder was cancelled and nothing said so.
    reminders = Reminders(pool, lead=24 * 3600, wake_window=1, wake=lambda: None)
    now = datetime.now(UTC)
    for n in range(12):
        snapshot = TodoSnapshot(f"missed{n}", "u", "missed", now - timedelta(minutes=1), False, False, 1)
        await reminders.apply(snapshot, event_id=str(uuid.uuid4()), event_at=now - timedelta(hours=2))
    scheduler = ReminderScheduler(pool, NoSends(), poll_interval=3600)  # type: ignore[arg-type]

    with capture_logs() as logs:
        await scheduler._send_due()

    assert await pending(pool) == []
    [given_up] = [e for e in logs if e["event"] == "reminders_given_up"]
    assert given_up["log_level"] == "warning"
    assert given_up["count"] == 12
    assert len(given_up["todo_ids"]) == 10 and set(given_up["todo_ids"]) <= {f"missed{n}" for n in range(12)}


async def due_reminders(pool: aiopg.Pool, prefix: str, titles: Sequence[str]) -> None:
    """A reminder due now for each title, in that order: todos ``<prefix>0``, ``<prefix>1``..., due in 1, 2... hours."""
    reminders = Reminders(pool, lead=24 * 3600, wake_window=1, wake=lambda: None)
    for n, title in enumerate(titles):
        snapshot = TodoSnapshot(f"{prefix}{n}", "u", title, datetime.now(UTC) + timedelta(hours=n + 1), False, False, 1)
        await reminders.apply(snapshot, event_id=str(uuid.uuid4()), event_at=datetime.now(UTC))


class CompletingNotifier:
    """Sends nothing; while "sending" the first reminder, the other todo is completed."""

    def __init__(self, pool: aiopg.Pool) -> None:
        self.pool = pool
        self.sent: list[str] = []

    async def notify(self, *, event_id: str, kind: str, user_id: str, values: dict[str, str], **_: Any) -> Outcome:
        self.sent.append(values["title"])
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("UPDATE reminders SET cancelled = true WHERE title <> %s", (values["title"],))
        return Outcome.SENT


async def test_a_reminder_cancelled_while_its_round_runs_is_not_sent(
    pool: aiopg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reminders_module, "SIDE_BY_SIDE", 1)  # so that the cancel falls between two sends
    await due_reminders(pool, "r", ("One", "Two"))
    notifier = CompletingNotifier(pool)
    scheduler = ReminderScheduler(pool, notifier, poll_interval=1)  # type: ignore[arg-type]

    await scheduler._send_due()  # one round: both were due when it read them

    assert notifier.sent == ["One"]


async def test_a_stopping_scheduler_sends_no_more_of_its_round(pool: aiopg.Pool) -> None:
    # The reminders sent side by side with the first are under way; no more start.
    side_by_side = reminders_module.SIDE_BY_SIDE
    titles = [f"Reminder {n:02}" for n in range(2 * side_by_side + 1)]
    await due_reminders(pool, "s", titles)
    sent: list[str] = []

    class StoppingNotifier:
        async def notify(self, *, event_id: str, kind: str, user_id: str, values: dict[str, str], **_: Any) -> Outcome:
            sent.append(values["title"])
            scheduler.stop()  # a shutdown begins while the first are being sent
            return Outcome.SENT

    scheduler = ReminderScheduler(pool, StoppingNotifier(), poll_interval=1)  # type: ignore[arg-type]
    await scheduler._send_due()
    assert sorted(sent) == titles[:side_by_side]  # each checked first whether it is still due, side by side


async def test_due_reminders_are_sent_side_by_side(pool: aiopg.Pool) -> None:
    # One at a time, a burst (every todo due at 09:00) went out over minutes
    # while most SMTP sessions idled.
    side_by_side = reminders_module.SIDE_BY_SIDE
    assert side_by_side > 1
    await due_reminders(pool, "p", [f"Burst {n}" for n in range(2 * side_by_side)])
    in_flight, most = 0, 0
    all_in = asyncio.Event()

    class SlowNotifier:
        async def notify(self, **_: Any) -> Outcome:
            nonlocal in_flight, most
            in_flight += 1
            most = max(most, in_flight)
            if in_flight == side_by_side:
                all_in.set()
            try:  # each send lasts until as many are under way as may be
                async with asyncio.timeout(5):
                    await all_in.wait()
            finally:
                in_flight -= 1
            return Outcome.SENT

    scheduler = ReminderScheduler(pool, SlowNotifier(), poll_interval=1)  # type: ignore[arg-type]
    await scheduler._send_due()
    assert most == side_by_side
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT count(*) FROM reminders WHERE todo_id LIKE 'p%%' AND sent_at IS NOT NULL")
        assert await cur.fetchone() == (2 * side_by_side,)


async def test_a_database_error_on_one_reminder_lets_those_beside_it_finish(
    pool: aiopg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Cancelled by it, a send beside it could be cut short after its mail
    # went out, and the reminder sent again.
    await due_reminders(pool, "e", ("Broken", "Beside"))
    still_due = repository.reminder_still_due
    broken = asyncio.Event()
    sent: list[str] = []

    async def away_for_one(db: aiopg.Pool, todo_id: str, event_id: str) -> bool:
        if todo_id == "e0":
            broken.set()
            raise psycopg2.OperationalError("the connection was lost")
        return await still_due(db, todo_id, event_id)

    class WaitingNotifier:
        async def notify(self, *, values: dict[str, str], **_: Any) -> Outcome:
            async with asyncio.timeout(5):
                await broken.wait()  # under way when the other fails
            await asyncio.sleep(0)
            sent.append(values["title"])
            return Outcome.SENT

    monkeypatch.setattr(repository, "reminder_still_due", away_for_one)
    scheduler = ReminderScheduler(pool, WaitingNotifier(), poll_interval=1)  # type: ignore[arg-type]
    with pytest.raises(psycopg2.OperationalError):
        await scheduler._send_due()
    assert sent == ["Beside"]
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT todo_id, sent_at IS NOT NULL FROM reminders WHERE todo_id LIKE 'e_' ORDER BY 1")
        assert await cur.fetchall() == [("e0", False), ("e1", True)]


async def test_a_reminder_met_by_the_shutdown_is_left_as_it_was_for_the_next_start(pool: aiopg.Pool) -> None:
    # Not deferred (a retry later), not cancelled, not marked sent: nothing
    # happened to it, and the next start sends it when it is due.
    await due_reminders(pool, "d", ("Left",))

    class StoppingNotifier:
        async def notify(self, **_: Any) -> Outcome:
            raise ShuttingDown()

    scheduler = ReminderScheduler(pool, StoppingNotifier(), poll_interval=1)  # type: ignore[arg-type]
    await scheduler._send_due()
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT retry_at, sent_at, cancelled FROM reminders WHERE todo_id = 'd0'")
        assert await cur.fetchone() == (None, None, False)


async def test_a_reminder_that_meets_a_bug_is_put_off_and_the_round_goes_on(pool: aiopg.Pool) -> None:
    await due_reminders(pool, "b", ("Cursed", "Fine"))
    sent: list[str] = []

    class BuggyNotifier:
        async def notify(self, *, event_id: str, kind: str, user_id: str, values: dict[str, str], **_: Any) -> Outcome:
            if values["title"] == "Cursed":
                raise AttributeError("'InvalidHeaderDefect' object has no attribute 'all_defects'")
            sent.append(values["title"])
            return Outcome.SENT

    scheduler = ReminderScheduler(pool, BuggyNotifier(), poll_interval=1)  # type: ignore[arg-type]
    await scheduler._send_due()
    assert sent == ["Fine"]
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT retry_at > now(), sent_at FROM reminders WHERE todo_id = 'b0'")
        assert await cur.fetchone() == (True, None)  # tried again later, not first in every round


class AnsweringDirectory:
    """The user-service's answer for everyone, and a sign that it was asked."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()

    async def recipient(self, user_id: str) -> Recipient:
        self.asked.set()
        return Recipient("ada@example.test", "Ada", verified=True)


async def test_a_reminder_completed_while_it_waits_for_an_smtp_session_is_not_sent(
    pool: aiopg.Pool, smtp: SmtpSink
) -> None:
    reminders = Reminders(pool, lead=24 * 3600, wake_window=1, wake=lambda: None)
    snapshot = TodoSnapshot("w1", "u", "Wait", datetime.now(UTC) + timedelta(hours=1), False, False, 1)
    await reminders.apply(snapshot, event_id=str(uuid.uuid4()), event_at=datetime.now(UTC))
    mailer = Mailer(SmtpSettings(host="127.0.0.1", port=smtp.port, mail_from=MAIL_FROM))
    directory = AnsweringDirectory()
    notifier = Notifier(pool, mailer, directory, sender=MAIL_FROM)  # type: ignore[arg-type]
    scheduler = ReminderScheduler(pool, notifier, poll_interval=1)

    async with contextlib.AsyncExitStack() as busy:  # every SMTP session busy, as behind a slow server
        for _ in range(SESSIONS):
            await busy.enter_async_context(mailer.slot())
        round_ = asyncio.create_task(scheduler._send_due())
        await asyncio.wait_for(directory.asked.wait(), timeout=10)  # checked as due, and on its way
        completed = replace(snapshot, completed=True, version=2)
        await reminders.apply(completed, event_id=str(uuid.uuid4()), event_at=datetime.now(UTC))
    await asyncio.wait_for(round_, timeout=10)
    await mailer.close()

    assert smtp.received == []
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT cancelled, sent_at FROM reminders WHERE todo_id = 'w1'")
        assert await cur.fetchone() == (True, None)
        await cur.execute("SELECT count(*) FROM notifications")
        assert await cur.fetchone() == (0,)  # the claim released: reopened, the todo is reminded of after all


class AheadOfTheDatabase(datetime):
    """This instance's clock, 2 s ahead of PostgreSQL's."""

    @classmethod
    def now(cls, tz: tzinfo | None = None) -> AheadOfTheDatabase:
        ahead = datetime.now(tz) + timedelta(seconds=2)
        return cls.fromtimestamp(ahead.timestamp(), tz)


async def test_a_clock_ahead_of_the_databases_does_not_make_the_scheduler_spin(
    pool: aiopg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The wait was the database's remind_at less the local time: negative
    # here, so clamped to 10 ms, and rounds ran back to back until the
    # reminder was due by the database's clock.
    monkeypatch.setattr(reminders_module, "datetime", AheadOfTheDatabase)
    rounds = 0
    read_due = repository.due_reminders

    async def counted(*args: Any, **kwargs: Any) -> list[repository.DueReminder]:
        nonlocal rounds
        rounds += 1
        return await read_due(*args, **kwargs)

    monkeypatch.setattr(repository, "due_reminders", counted)
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT now() + interval '1.5 seconds'")
        (remind_at,) = await cur.fetchone()
    lead = 3600.0
    snapshot = TodoSnapshot("c1", "u", "Clock", remind_at + timedelta(seconds=lead), False, False, 1)
    await Reminders(pool, lead=lead, wake_window=1, wake=lambda: None).apply(
        snapshot, event_id=str(uuid.uuid4()), event_at=datetime.now(UTC)
    )
    notifier = CompletingNotifier(pool)
    scheduler = ReminderScheduler(pool, notifier, poll_interval=5)  # type: ignore[arg-type]
    running = asyncio.create_task(scheduler.run())
    try:
        await eventually(lambda: notifier.sent, within=10, what="the reminder sent")
    finally:
        scheduler.stop()
        await asyncio.wait_for(running, timeout=10)
    assert notifier.sent == ["Clock"]
    assert rounds <= 4  # one to find it not due yet, one to send it: not a hundred
