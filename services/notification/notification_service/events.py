"""The events this service consumes, and what each one does.

``user.registered``  a welcome email; the address is in the event.
``todo.completed``   a short notice to the todo's owner; cancels its reminder.
``todo.*``           keeps the todo's reminder in step with its snapshot
                     (created, updated, reopened, deleted).

Only version 1 of each is understood: anything else, or an event that lacks
what we need, is refused (``UnprocessableEvent``) rather than guessed at.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from mesh_common.events import Event

from .directory import Recipient
from .failures import ExpiredEvent, MalformedEvent, UnsupportedEvent
from .notifier import Notifier, Outcome
from .reminders import Reminders, TodoSnapshot

log = structlog.get_logger()

SUPPORTED_VERSION = 1
TODO_EVENTS = frozenset({"todo.created", "todo.updated", "todo.completed", "todo.reopened", "todo.deleted"})
HANDLED = TODO_EVENTS | {"user.registered"}


def parse(body: bytes) -> Event:
    """The event in ``body``, if it is one we can handle."""
    try:
        event = Event.from_json(body)
    except ValueError as exc:
        raise MalformedEvent(str(exc)) from None
    if event.version != SUPPORTED_VERSION or event.type not in HANDLED:
        raise UnsupportedEvent(f"{event.type} v{event.version}")
    return event


class EventHandler:
    def __init__(self, notifier: Notifier, reminders: Reminders, *, retention: float) -> None:
        self._notifier = notifier
        self._reminders = reminders
        self._retention = timedelta(seconds=retention)

    async def handle(self, event: Event) -> Outcome | None:
        """Act on ``event``; the outcome of the email it causes, if any."""
        if occurred_at(event) < datetime.now(UTC) - self._retention:
            # The rows that make handling it idempotent may be pruned: it
            # could send an email twice, or bring back a deleted todo's reminder.
            raise ExpiredEvent(f"occurred at {event.occurred_at}, before the retention")
        if event.type == "user.registered":
            return await self._welcome(event)
        await self._reminders.apply(todo_snapshot(event), event_id=event.id, event_at=occurred_at(event))
        if event.type == "todo.completed":
            return await self._notifier.notify(
                event_id=event.id,
                kind="todo_completed",
                user_id=event.user_id,
                values={"title": text(event.data, "title")},
            )
        return None

    async def _welcome(self, event: Event) -> Outcome:
        username = text(event.data, "username")
        recipient = Recipient(email=text(event.data, "email"), name=str(event.data.get("display_name") or username))
        return await self._notifier.notify(
            event_id=event.id,
            kind="welcome",
            user_id=text(event.data, "user_id"),
            values={"username": username},
            recipient=recipient,
        )


def text(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise MalformedEvent(f"data.{key} must be a non-empty string")
    return value


def timestamp(raw: object, what: str) -> datetime:
    if not isinstance(raw, str):
        raise MalformedEvent(f"{what} must be an ISO 8601 string")
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise MalformedEvent(f"{what} must be an ISO 8601 string") from None
    # Producers write UTC; a timestamp without an offset is read as UTC too.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def occurred_at(event: Event) -> datetime:
    return timestamp(event.occurred_at, "occurred_at")


def todo_snapshot(event: Event) -> TodoSnapshot:
    data = event.data
    deleted = event.type == "todo.deleted"
    due_at = data.get("due_at")
    return TodoSnapshot(
        id=text(data, "id"),
        user_id=event.user_id,
        # A deleted todo's title is never shown; do not insist on it.
        title=str(data.get("title") or "") if deleted else text(data, "title"),
        due_at=None if due_at is None else timestamp(due_at, "data.due_at"),
        completed=data.get("completed") is True,
        deleted=deleted,
        version=todo_version(data),
    )


def todo_version(data: dict[str, Any]) -> int:
    # What orders a todo's events (see reminders): without it, an event
    # could neither be placed after nor before the ones already applied.
    value = data.get("version")
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise MalformedEvent("data.version must be a positive integer")
    return value
