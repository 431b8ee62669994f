"""The SQL: sent notifications' history and scheduled reminders (the claims are in claims.py).

Every query runs through ``cursor`` (or ``transaction``, for more than one
statement), which turns PostgreSQL being away (a restart, a dropped
connection, a connection or statement timeout) into
``DatabaseUnavailable``, a ``TemporaryFailure``: the consumer retries the
event later through the retry queues, as for an SMTP outage. Left as it
was, it would count as a bug and be redelivered at once, spending the
event's few failures in milliseconds and dead-lettering good events.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiopg
import psycopg2

from mesh_common import transactions
from mesh_common.transactions import CommitOutcomeUnknown, server_cancels_as_errors

from .failures import DatabaseUnavailable


@asynccontextmanager
async def cursor(pool: aiopg.Pool) -> AsyncIterator[aiopg.Cursor]:
    try:
        with server_cancels_as_errors():
            async with pool.acquire() as conn, conn.cursor() as cur:
                yield cur
    # OperationalError: refused, dropped, shut down, out of resources,
    # serialization failures and deadlocks, statements the server cancelled;
    # InterfaceError: a pooled connection found closed; TimeoutError: aiopg's
    # connect or statement timeout. Errors in the SQL or the data
    # (ProgrammingError, DataError...) stay bugs.
    except (psycopg2.OperationalError, psycopg2.InterfaceError, TimeoutError) as exc:
        raise DatabaseUnavailable(type(exc).__name__) from exc


@asynccontextmanager
async def transaction(pool: aiopg.Pool) -> AsyncIterator[aiopg.Cursor]:
    """``cursor``, inside BEGIN ... COMMIT: rolled back on any error, a COMMIT whose answer was lost asked after."""
    try:
        with server_cancels_as_errors():
            async with transactions.transaction(pool) as cur:
                yield cur
    # CommitOutcomeUnknown: made or not, nobody knows. Retried as an outage,
    # which is safe only for a write that can be found made, or made again.
    except (psycopg2.OperationalError, psycopg2.InterfaceError, TimeoutError, CommitOutcomeUnknown) as exc:
        raise DatabaseUnavailable(type(exc).__name__) from exc


# -- history -----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SentNotification:
    id: str
    event_id: str
    kind: str
    recipient: str
    subject: str
    sent_at: datetime


async def sent_notifications(
    pool: aiopg.Pool, user_id: str, *, limit: int, before: tuple[datetime, str] | None
) -> list[SentNotification]:
    """A user's sent notifications, newest first, strictly after the ``before`` (sent_at, id) position."""
    where = "user_id = %s AND status = 'sent'"
    params: list[Any] = [user_id]
    if before is not None:
        where += " AND (sent_at, id) < (%s, %s::uuid)"
        params.extend(before)
    async with cursor(pool) as cur:
        await cur.execute(
            f"SELECT id, event_id, kind, recipient, subject, sent_at FROM notifications"
            f" WHERE {where} ORDER BY sent_at DESC, id DESC LIMIT %s",
            (*params, limit),
        )
        rows = await cur.fetchall()
    return [SentNotification(str(r[0]), str(r[1]), r[2], r[3], r[4], r[5]) for r in rows]


# -- reminders ---------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TodoState:
    """What the latest todo event says, as far as reminders are concerned."""

    todo_id: str
    user_id: str
    title: str
    due_at: datetime | None
    remind_at: datetime | None
    cancelled: bool
    event_id: str
    event_at: datetime
    # The todo's data.version, and whether the event was its deletion: their
    # order is the order of the todo's changes (migration 0003).
    version: int
    deleted: bool


@dataclass(frozen=True, slots=True)
class DueReminder:
    todo_id: str
    user_id: str
    title: str
    due_at: datetime
    event_id: str


async def apply_todo_state(pool: aiopg.Pool, state: TodoState) -> bool:
    """Upsert the todo's reminder; False if a later change was applied already.

    A changed due date is a new reminder: it takes this event's id as its
    idempotency key and is unsent again. Anything else (a new title,
    completing, reopening) keeps the key, so a reminder already sent for this
    due date is not sent twice.
    """
    async with cursor(pool) as cur:
        await cur.execute(
            """
            INSERT INTO reminders (todo_id, user_id, title, due_at, remind_at, cancelled, event_id, event_at,
                                   todo_version, todo_deleted)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT (todo_id) DO UPDATE SET
                user_id = EXCLUDED.user_id,
                title = EXCLUDED.title,
                cancelled = EXCLUDED.cancelled,
                event_at = EXCLUDED.event_at,
                todo_version = EXCLUDED.todo_version,
                todo_deleted = EXCLUDED.todo_deleted,
                due_at = EXCLUDED.due_at,
                remind_at = EXCLUDED.remind_at,
                event_id = CASE WHEN reminders.due_at IS DISTINCT FROM EXCLUDED.due_at
                                THEN EXCLUDED.event_id ELSE reminders.event_id END,
                sent_at = CASE WHEN reminders.due_at IS DISTINCT FROM EXCLUDED.due_at
                               THEN NULL ELSE reminders.sent_at END,
                retry_at = CASE WHEN reminders.due_at IS DISTINCT FROM EXCLUDED.due_at
                                THEN NULL ELSE reminders.retry_at END
            WHERE CASE WHEN reminders.todo_version IS NULL THEN reminders.event_at < EXCLUDED.event_at
                       ELSE (reminders.todo_version, reminders.todo_deleted)
                            < (EXCLUDED.todo_version, EXCLUDED.todo_deleted) END
            RETURNING todo_id
            """,
            (
                state.todo_id,
                state.user_id,
                state.title,
                state.due_at,
                state.remind_at,
                state.cancelled,
                state.event_id,
                state.event_at,
                state.version,
                state.deleted,
            ),
        )
        return await cur.fetchone() is not None


# A reminder still to be sent: not sent yet, not cancelled, its todo not overdue.
_PENDING = "sent_at IS NULL AND NOT cancelled AND due_at > now()"


async def due_reminders(pool: aiopg.Pool, *, limit: int = 100) -> list[DueReminder]:
    """Unsent reminders whose time has come, for todos that are not overdue yet."""
    async with cursor(pool) as cur:
        await cur.execute(
            f"SELECT todo_id, user_id, title, due_at, event_id FROM reminders WHERE {_PENDING}"
            " AND remind_at <= now() AND (retry_at IS NULL OR retry_at <= now())"
            " ORDER BY remind_at LIMIT %s",
            (limit,),
        )
        rows = await cur.fetchall()
    return [DueReminder(r[0], r[1], r[2], r[3], str(r[4])) for r in rows]


async def expire_overdue_reminders(pool: aiopg.Pool) -> list[str]:
    """Cancel the reminders whose todo fell due unreminded: they will never be sent.

    Left pending, they would stay first in reminders_pending (the earliest
    remind_at) and every round would walk past them again. ``remind_at <=
    now()`` is implied by the due date having passed, and lets the index
    find them. A later event of the todo sets ``cancelled`` afresh.

    Returns the todos of those that were missed: tried and put off, or armed
    before their todo fell due (a todo given a due date already past was
    never to be reminded of). Both, since a later event of the todo, a new
    title, moves ``event_at`` on and keeps ``retry_at``.
    """
    async with cursor(pool) as cur:
        await cur.execute(
            "UPDATE reminders SET cancelled = true"
            " WHERE sent_at IS NULL AND NOT cancelled AND remind_at <= now() AND due_at <= now()"
            " RETURNING todo_id, retry_at IS NOT NULL OR event_at < due_at"
        )
        return [todo_id for todo_id, missed in await cur.fetchall() if missed]


async def seconds_to_next_reminder(pool: aiopg.Pool) -> float | None:
    """How long until the earliest pending reminder can be sent, its retry's time included, by the database's clock.

    Negative when it can be sent already. Counted here, not against this
    instance's clock: one ahead of the database's by a few seconds saw the
    reminder due that long before ``due_reminders`` did, and ran rounds back
    to back meanwhile.
    """
    async with cursor(pool) as cur:
        await cur.execute(
            # In two parts, each read from an index: min(GREATEST(remind_at,
            # retry_at)) over every pending reminder read them all, every round.
            # LEAST and GREATEST ignore NULLs.
            f"SELECT EXTRACT(EPOCH FROM LEAST("
            f" (SELECT remind_at FROM reminders WHERE {_PENDING} AND retry_at IS NULL ORDER BY remind_at LIMIT 1),"
            f" (SELECT min(GREATEST(remind_at, retry_at)) FROM reminders WHERE {_PENDING} AND retry_at IS NOT NULL)"
            f") - now())"
        )
        row = await cur.fetchone()
    return None if row is None or row[0] is None else float(row[0])


async def mark_reminder_sent(pool: aiopg.Pool, todo_id: str, event_id: str) -> None:
    # Matching the event id too: if the due date changed while we were
    # sending, the new reminder stays unsent.
    async with cursor(pool) as cur:
        await cur.execute(
            "UPDATE reminders SET sent_at = now() WHERE todo_id = %s AND event_id = %s", (todo_id, event_id)
        )


async def reminder_still_due(pool: aiopg.Pool, todo_id: str, event_id: str) -> bool:
    """Whether the reminder is still to be sent: its todo may have changed since the round read it."""
    async with cursor(pool) as cur:
        await cur.execute(
            f"SELECT 1 FROM reminders WHERE todo_id = %s AND event_id = %s AND {_PENDING}",
            (todo_id, event_id),
        )
        return await cur.fetchone() is not None


async def defer_reminder(pool: aiopg.Pool, todo_id: str, event_id: str, seconds: float) -> None:
    async with cursor(pool) as cur:
        await cur.execute(
            "UPDATE reminders SET retry_at = now() + make_interval(secs => %s) WHERE todo_id = %s AND event_id = %s",
            (seconds, todo_id, event_id),
        )


async def cancel_reminder(pool: aiopg.Pool, todo_id: str, event_id: str) -> None:
    async with cursor(pool) as cur:
        await cur.execute(
            "UPDATE reminders SET cancelled = true WHERE todo_id = %s AND event_id = %s", (todo_id, event_id)
        )
