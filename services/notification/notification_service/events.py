"""The events this service consumes, and what each one does.

``user.email_verification_requested``
                     the code that proves an address, sent to the address
                     in the event (on registration it is the welcome);
                     not sent once it has expired.
``user.registered``  nothing any more (the verification email welcomes):
                     still bound, so that queued ones are acked, not dead.
``user.password_changed``
                     a security notice to the address the account had
                     then, if verified, or else to the last address it
                     proved, if any: if the change was not its owner's,
                     someone else has their account.
``user.email_changed``
                     the same notice, to the address the account had
                     before (or the last it proved): whoever has the
                     password could otherwise move the account to their
                     own address first.
``todo.completed``   a short notice to the todo's owner; cancels its reminder.
``todo.*``           keeps the todo's reminder in step with its snapshot
                     (created, updated, reopened, deleted).

Every email but the code goes only to an address its owner verified
(notifier.py): the user-service's profile says so.

Only version 1 of each is understood: anything else, or an event that lacks
what we need, is refused (``UnprocessableEvent``) rather than guessed at.
"""

from __future__ import annotations

import re
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
VERIFICATION_REQUESTED = "user.email_verification_requested"
PASSWORD_CHANGED = "user.password_changed"
EMAIL_CHANGED = "user.email_changed"
# The security notices: the kind of email each one sends.
NOTICES = {PASSWORD_CHANGED: "password_changed", EMAIL_CHANGED: "email_changed"}
HANDLED = TODO_EVENTS | {"user.registered", VERIFICATION_REQUESTED} | NOTICES.keys()
# Why a code was sent: the first lines of its email. Another reason is refused, not guessed at.
REASONS = {
    "registered": 'Welcome to todo-mesh! Your account "{username}" is ready. Confirm that this address is yours',
    "email_changed": 'The email address of your todo-mesh account "{username}" was changed to this one. Confirm it',
    "requested": 'You asked for a new code for your todo-mesh account "{username}". Confirm this address',
}
# A notice's paragraph when it goes to the last address the account proved,
# not to the one it has: the reader may have changed it long ago.
WHY_HERE = (
    "\n\nThis mail comes to this address because it is the last one the account"
    "\nconfirmed: the one the account had at the change was not confirmed."
)
# A moment in an email: timestamp() makes every one UTC.
WHEN = "%a %d %b %Y, %H:%M UTC"
# A token as the user-service writes them (secrets.token_urlsafe): on a line of its own, nothing to escape.
TOKEN = re.compile(r"[A-Za-z0-9_-]{1,200}")


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
        if event.type == VERIFICATION_REQUESTED:
            return await self._verification(event)
        if event.type == "user.registered":
            return None  # welcomed by its verification email
        if event.type in NOTICES:
            return await self._notice(event, NOTICES[event.type])
        await self._reminders.apply(todo_snapshot(event), event_id=event.id, event_at=occurred_at(event))
        if event.type == "todo.completed":
            return await self._notifier.notify(
                event_id=event.id,
                kind="todo_completed",
                user_id=event.user_id,
                values={"title": text(event.data, "title")},
            )
        return None

    async def _notice(self, event: Event, kind: str) -> Outcome:
        # To an address the event names, the account's at the change, not
        # the one it has when this is handled: whoever made the change may
        # have set their own since. And only to one proven by then: the
        # account's, if verified, or else the last it proved, which a change
        # of case (unverifying the owner's) cannot take from the owner.
        data = event.data
        username, email = text(data, "username"), text(data, "email")
        values = {"username": username, "changed_at": occurred_at(event).strftime(WHEN)}
        if data.get("email_verified") is True:
            values |= {"previous": "this one", "why_here": ""}
        elif data.get("last_verified_email") is not None:
            email = text(data, "last_verified_email")
            values |= {"previous": "one not confirmed", "why_here": WHY_HERE}
        else:
            log.info("notification_skipped", event_id=event.id, kind=kind, reason="unverified")
            return Outcome.UNVERIFIED
        return await self._notifier.notify(
            event_id=event.id,
            kind=kind,
            user_id=event.user_id,
            values=values,
            recipient=Recipient(email=email, name=str(data.get("display_name") or username), verified=True),
        )

    async def _verification(self, event: Event) -> Outcome:
        data = event.data
        username, token = text(data, "username"), text(data, "token")
        if TOKEN.fullmatch(token) is None:
            raise MalformedEvent("data.token must be a URL-safe token")  # never the token itself: it is a secret
        reason = REASONS.get(text(data, "reason"))
        if reason is None:
            raise MalformedEvent("data.reason must be registered, email_changed or requested")
        expires_at = timestamp(data.get("expires_at"), "data.expires_at")
        if expires_at <= datetime.now(UTC):
            log.info("notification_skipped", event_id=event.id, kind="verify_email", reason="expired")
            return Outcome.EXPIRED
        recipient = Recipient(email=text(data, "email"), name=str(data.get("display_name") or username))
        return await self._notifier.notify(
            event_id=event.id,
            kind="verify_email",
            user_id=text(data, "user_id"),
            values={
                "reason": reason.format(username=username),
                "token": token,
                "expires_at": expires_at.strftime(WHEN),
            },
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
        # Producers write UTC; a timestamp without an offset is read as UTC
        # too. Made UTC here, where the last day of 9999 west of Greenwich,
        # past datetime's range, is refused as malformed, not met later as
        # a bug to retry.
        return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise MalformedEvent(f"{what} must be an ISO 8601 string within years 1-9999") from None


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
