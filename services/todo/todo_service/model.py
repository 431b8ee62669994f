"""What a todo is, apart from how it is stored or served."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

TITLE_MAX = 200
DESCRIPTION_MAX = 2000
PRIORITIES = ("low", "normal", "high")
DEFAULT_PRIORITY = "normal"


@dataclass(frozen=True, slots=True)
class NewTodo:
    title: str
    description: str | None = None
    due_at: datetime | None = None
    priority: str = DEFAULT_PRIORITY


@dataclass(frozen=True, slots=True)
class Todo:
    id: str
    owner_id: str
    title: str
    description: str | None
    due_at: datetime | None
    priority: str
    completed: bool
    completed_at: datetime | None
    version: int
    created_at: datetime
    updated_at: datetime

    def snapshot(self) -> dict[str, Any]:
        """The todo as JSON: what events carry and what views are made of."""
        return {
            "id": self.id,
            "owner_id": self.owner_id,
            "title": self.title,
            "description": self.description,
            "due_at": timestamp(self.due_at),
            "priority": self.priority,
            "completed": self.completed,
            "completed_at": timestamp(self.completed_at),
            "version": self.version,
            "created_at": timestamp(self.created_at),
            "updated_at": timestamp(self.updated_at),
        }


@dataclass(frozen=True, slots=True)
class ListQuery:
    """One page of an owner's todos, newest first, and what to filter them by."""

    limit: int = 20
    after: tuple[datetime, str] | None = None  # (created_at, id) of the last todo seen
    completed: bool | None = None
    due_before: datetime | None = None
    title_contains: str | None = None


def timestamp(value: datetime | None) -> str | None:
    """RFC 3339 in UTC, whatever time zone the database session uses."""
    return value.astimezone(UTC).isoformat() if value is not None else None


def etag(version: int) -> str:
    # Weak: the version names the stored state, while the bytes of a view
    # also depend on the owner's profile, which may be degraded.
    return f'W/"{version}"'
