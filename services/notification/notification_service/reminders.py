"""Reminders for todos that fall due, scheduled from todo events alone.

Every todo event carries the todo's snapshot, so the ``reminders`` table can
follow each todo without ever reading the todo-service's database: a due
date arms a reminder for ``lead`` seconds before it; completing, deleting or
clearing the due date disarms it; reopening arms it again (unless it was
sent already for that due date).

A scheduler task sends the reminders whose time has come. It polls its own
table rather than using a delay queue: a reminder moves whenever its todo's
due date does, and a row is easy to move, while a message already delayed in
a queue cannot be taken back. It sleeps until the next reminder is due, but
never longer than ``poll_interval``, and is woken early when an event arms a
reminder due sooner than that.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import aiopg
import structlog

from mesh_common.app import wait_event

from . import repository
from .failures import DeliveryInProgress, MailOutcomeUnknown, ShuttingDown, TemporaryFailure, UnprocessableEvent
from .mailer import SESSIONS
from .notifier import Notifier, Outcome
from .recipient_cap import CapDeferred

log = structlog.get_logger()
# How soon a round starts again after one found a reminder held by another
# delivery (up to its lease, about 80 s): soon enough for the reminders due
# behind it, without polling the database in a tight loop.
HELD_RECHECK_SECONDS = 5.0
# A reminder that failed for a passing reason is tried again this much later,
# and the round goes on with the ones behind it. As many failures in a row
# as FAILURES_IN_A_ROW mean a dependency is down for everyone: the round ends.
RETRY_SECONDS = 60.0
FAILURES_IN_A_ROW = 3
# Of the reminders given up in a round, the todos named in its log line.
MISSED_LOGGED = 10
# Reminders sent side by side: one at a time, a burst (every todo due at
# 09:00) went out over minutes while most SMTP sessions idled. Half of the
# mailer's sessions, so that the events' emails still find one free.
SIDE_BY_SIDE = SESSIONS // 2


@dataclass(frozen=True, slots=True)
class TodoSnapshot:
    id: str
    user_id: str
    title: str
    due_at: datetime | None
    completed: bool
    deleted: bool
    version: int


class Reminders:
    def __init__(self, pool: aiopg.Pool, *, lead: float, wake_window: float, wake: Callable[[], None]) -> None:
        self._pool = pool
        self._lead = timedelta(seconds=lead)
        self._wake_window = timedelta(seconds=wake_window)
        self._wake = wake

    async def apply(self, todo: TodoSnapshot, *, event_id: str, event_at: datetime) -> None:
        remind_at = _lead_before(todo.due_at, self._lead) if todo.due_at is not None else None
        state = repository.TodoState(
            todo_id=todo.id,
            user_id=todo.user_id,
            title=todo.title,
            due_at=todo.due_at,
            remind_at=remind_at,
            cancelled=todo.completed or todo.deleted or todo.due_at is None,
            event_id=event_id,
            event_at=event_at,
            version=todo.version,
            deleted=todo.deleted,
        )
        if not await repository.apply_todo_state(self._pool, state):
            log.info("reminder_event_not_newer", todo_id=todo.id, event_id=event_id)
            return
        if not state.cancelled and remind_at is not None and remind_at <= datetime.now(UTC) + self._wake_window:
            self._wake()


class ReminderScheduler:
    def __init__(self, pool: aiopg.Pool, notifier: Notifier, *, poll_interval: float, batch: int = 100) -> None:
        self._pool = pool
        self._notifier = notifier
        self._poll_interval = poll_interval
        self._batch = batch
        self._woken = asyncio.Event()
        self._stopping = False

    def wake(self) -> None:
        self._woken.set()

    def stop(self) -> None:
        """Ask ``run`` to return after the current round.

        A flag, not only ``Task.cancel()``: on Python 3.11 a cancellation that
        arrives as a query finishes can be lost inside aiopg (its
        ``asyncio.wait_for``), and the loop would go on.
        """
        self._stopping = True
        self._woken.set()

    async def run(self) -> None:
        while not self._stopping:
            self._woken.clear()
            try:
                delay = await self._send_due()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is away: try again next round
                log.warning("reminders_round_failed", error=type(exc).__name__)
                delay = self._poll_interval
            await wait_event(self._woken, delay)

    async def _send_due(self) -> float:
        """Send every due reminder; returns how long to sleep before the next round."""
        missed = await repository.expire_overdue_reminders(self._pool)
        if missed:
            # Lost for good: kept from going out until their todo fell due, by
            # an outage, the recipient cap, or this service not running.
            log.warning("reminders_given_up", count=len(missed), todo_ids=missed[:MISSED_LOGGED])
        while True:
            due = await repository.due_reminders(self._pool, limit=self._batch)
            held = failures = 0
            for start in range(0, len(due), SIDE_BY_SIDE):
                if self._stopping:  # the rest wait for the next instance, or the next start
                    return self._poll_interval
                group = due[start : start + SIDE_BY_SIDE]
                # Each left to end: one's error (the database away) cancelling
                # the others could cut a send short after its mail went out.
                results = await asyncio.gather(*map(self._send, group), return_exceptions=True)
                error: BaseException | None = None
                for reminder, sent in zip(group, results, strict=True):
                    if isinstance(sent, BaseException):
                        error = error or sent
                    elif sent is None:
                        held += 1
                    elif not sent:
                        await repository.defer_reminder(self._pool, reminder.todo_id, reminder.event_id, RETRY_SECONDS)
                        failures += 1
                    else:
                        failures = 0
                if error is not None:
                    raise error
                if failures >= FAILURES_IN_A_ROW:
                    return self._poll_interval  # a dependency is down: give it a round
            if held:
                # A held reminder stays first in line until its delivery ends or
                # its lease runs out: look again in a while, not at once and not
                # by fetching the same rows again.
                return min(self._poll_interval, HELD_RECHECK_SECONDS)
            if len(due) < self._batch:
                break
        wait = await repository.seconds_to_next_reminder(self._pool)
        if wait is None:
            return self._poll_interval
        return min(self._poll_interval, max(0.01, wait))

    async def _send(self, reminder: repository.DueReminder) -> bool | None:
        """True when done with, False when it failed for now, None when another delivery holds it."""
        still_due = functools.partial(repository.reminder_still_due, self._pool, reminder.todo_id, reminder.event_id)
        # Asked here, before the user lookup, and again by the notifier just
        # before it sends: the lookup and the wait for an SMTP session can be
        # long enough for the todo to be completed, deleted or moved.
        if not await still_due():
            return True  # completed, deleted or moved since this round read it
        with structlog.contextvars.bound_contextvars(todo_id=reminder.todo_id, event_id=reminder.event_id):
            try:
                outcome = await self._notifier.notify(
                    event_id=reminder.event_id,
                    kind="reminder",
                    user_id=reminder.user_id,
                    values=reminder_values(reminder.title, reminder.due_at, datetime.now(UTC)),
                    still_wanted=still_due,
                    defer_over_cap=True,
                )
            except (DeliveryInProgress, MailOutcomeUnknown) as exc:
                # About this one reminder, not about a dependency: the others go on.
                log.info("reminder_held", error=type(exc).__name__)
                return None
            except CapDeferred as exc:
                # The user's own reminder, due once: sent when the hour frees a
                # slot rather than dropped. No failure of a dependency either.
                await repository.defer_reminder(self._pool, reminder.todo_id, reminder.event_id, exc.retry_after)
                return True
            except ShuttingDown:
                log.info("reminder_left_for_the_next_start")
                return None
            except TemporaryFailure as exc:
                log.warning("reminder_deferred", error=type(exc).__name__, detail=str(exc))
                return False
            except UnprocessableEvent as exc:
                log.error("reminder_undeliverable", error=type(exc).__name__, detail=str(exc))
                outcome = Outcome.NO_RECIPIENT
            except Exception:
                # A bug, met on this reminder. Escaping, it failed the round,
                # and the next round met the same reminder first: nobody's
                # reminders went out until this todo was due.
                log.exception("reminder_failed")
                return False
        if outcome is Outcome.NO_RECIPIENT:
            await repository.cancel_reminder(self._pool, reminder.todo_id, reminder.event_id)
        elif outcome is not Outcome.WITHDRAWN:  # withdrawn: the change that withdrew it is in the row already
            # Unconfirmed and unverified too: it is sent no more (an address
            # verified later gets the todo's next due date), and left
            # pending, every round would meet it again.
            await repository.mark_reminder_sent(self._pool, reminder.todo_id, reminder.event_id)
        return True


def reminder_values(title: str, due_at: datetime, now: datetime) -> dict[str, str]:
    minutes = max(1, round((due_at - now).total_seconds() / 60))
    due_in = f"in {minutes} minute{'s' * (minutes != 1)}" if minutes < 90 else f"in {round(minutes / 60)} hours"
    due_at = due_at.astimezone(UTC)
    return {
        "title": title,
        "due_in": due_in,
        "due_at": due_at.strftime("%a %d %b %Y, %H:%M UTC"),
        "due_at_iso": due_at.isoformat(),
    }


def _lead_before(due_at: datetime, lead: timedelta) -> datetime:
    try:
        return due_at - lead
    except OverflowError:
        # Due within ``lead`` of the first date Python knows (the todo-service
        # takes any RFC 3339 date): long past, so never reminded of. Clamped,
        # not refused: refusing dead-lettered every later event of the todo.
        return datetime.min.replace(tzinfo=UTC)
