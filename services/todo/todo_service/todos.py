"""What can be done with todos: each change commits together with its event.

Every method takes the owner's id and finds todos only through it, so that
another user's todo and a missing one are the same thing: ``TodoNotFound``.
Changes lock the row (``FOR UPDATE``), check the ``If-Match`` precondition
against the locked version, write the new version and enqueue the event,
all in one transaction: no change without its event, and no event without
its change.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiopg

from mesh_common.cursors import encode_cursor
from mesh_common.outbox import enqueue, publishing
from mesh_common.problems import PreconditionFailed, problem

from . import idempotency, repository
from .events import TODO_COMPLETED, TODO_CREATED, TODO_DELETED, TODO_REOPENED, TODO_UPDATED, todo_event
from .idempotency import IdempotentRequest, StoredResponse
from .model import ListQuery, NewTodo, Todo
from .validation import IfMatch

# Always raised bare: one body for every case, so that "not yours" cannot be
# told from "not there".
TodoNotFound = problem(404, "TODO_NOT_FOUND", "Todo not found")


@dataclass(frozen=True, slots=True)
class Created:
    """The answer to a creation: ``replayed`` when an earlier request with the same key made it."""

    status: int
    snapshot: dict[str, Any]
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class Page:
    items: list[Todo]
    next_cursor: str | None


class Todos:
    def __init__(self, pool: aiopg.Pool, committed: asyncio.Event) -> None:
        self._pool = pool
        # Wakes the outbox relay once a change and its event have committed.
        self._committed = committed

    async def create(
        self, owner_id: str, new: NewTodo, *, correlation_id: str, idempotent: IdempotentRequest | None = None
    ) -> Created:
        async with publishing(self._pool, self._committed) as cur:
            while idempotent is not None and not await idempotency.claim_key(cur, owner_id, idempotent):
                stored = await idempotency.stored_response(cur, owner_id, idempotent)
                if stored is not None:
                    return Created(stored.status, stored.body, replayed=True)
            todo = await repository.insert_todo(cur, owner_id, new)
            await enqueue(cur, todo_event(TODO_CREATED, todo, correlation_id=correlation_id))
            created = Created(201, todo.snapshot())
            if idempotent is not None:
                await idempotency.store_response(
                    cur, owner_id, idempotent, StoredResponse(created.status, created.snapshot)
                )
        return created

    async def get(self, owner_id: str, todo_id: str) -> Todo:
        async with self._pool.acquire() as conn, conn.cursor() as cur:
            todo = await repository.find_todo(cur, owner_id, todo_id)
        if todo is None:
            raise TodoNotFound()
        return todo

    async def page(self, owner_id: str, query: ListQuery) -> Page:
        async with self._pool.acquire() as conn, conn.cursor() as cur:
            todos = await repository.list_todos(cur, owner_id, query)
        if len(todos) > query.limit:
            todos = todos[: query.limit]
            return Page(todos, encode_cursor(todos[-1].created_at, todos[-1].id))
        return Page(todos, None)

    async def update(
        self,
        owner_id: str,
        todo_id: str,
        changes: dict[str, Any],
        *,
        if_match: IfMatch | None,
        correlation_id: str,
    ) -> Todo:
        return await self._change(
            owner_id,
            todo_id,
            lambda todo: _with_changes(todo, changes),
            TODO_UPDATED,
            if_match=if_match,
            correlation_id=correlation_id,
        )

    async def complete(self, owner_id: str, todo_id: str, *, if_match: IfMatch | None, correlation_id: str) -> Todo:
        return await self._change(
            owner_id,
            todo_id,
            lambda todo: None if todo.completed else dataclasses.replace(todo, completed=True),
            TODO_COMPLETED,
            if_match=if_match,
            correlation_id=correlation_id,
        )

    async def reopen(self, owner_id: str, todo_id: str, *, if_match: IfMatch | None, correlation_id: str) -> Todo:
        return await self._change(
            owner_id,
            todo_id,
            lambda todo: dataclasses.replace(todo, completed=False) if todo.completed else None,
            TODO_REOPENED,
            if_match=if_match,
            correlation_id=correlation_id,
        )

    async def delete(self, owner_id: str, todo_id: str, *, if_match: IfMatch | None, correlation_id: str) -> None:
        async with publishing(self._pool, self._committed) as cur:
            todo = await self._locked(cur, owner_id, todo_id, if_match)
            await repository.delete_todo(cur, todo)
            await enqueue(cur, todo_event(TODO_DELETED, todo, correlation_id=correlation_id))

    async def _change(
        self,
        owner_id: str,
        todo_id: str,
        change: Callable[[Todo], Todo | None],
        event_type: str,
        *,
        if_match: IfMatch | None,
        correlation_id: str,
    ) -> Todo:
        """Apply ``change`` to the locked todo; it returns None when there is nothing to do.

        Completing a completed todo, or a PATCH of every field to the value
        it has, changes nothing: no new version, no event (and so no second
        email, and no todo.updated that says a todo changed when it did not).
        """
        async with publishing(self._pool, self._committed) as cur:
            todo = await self._locked(cur, owner_id, todo_id, if_match)
            changed = change(todo)
            if changed is None:
                return todo
            saved = await repository.save_todo(cur, changed)
            await enqueue(cur, todo_event(event_type, saved, correlation_id=correlation_id))
        return saved

    @staticmethod
    async def _locked(cur: Any, owner_id: str, todo_id: str, if_match: IfMatch | None) -> Todo:
        todo = await repository.find_todo(cur, owner_id, todo_id, for_update=True)
        # Ownership first: a stale If-Match on someone else's todo is still a 404.
        if todo is None:
            raise TodoNotFound()
        if if_match is not None and not if_match.matches(todo.version):
            raise PreconditionFailed(
                "The todo was changed since you read it; fetch it again", current_version=todo.version
            )
        return todo


def _with_changes(todo: Todo, changes: dict[str, Any]) -> Todo | None:
    """``todo`` with ``changes``, or None when it already has every one of them.

    Compared as parsed: a title is trimmed and a due date is an instant, so
    that "  a " and "a", or 09:00+01:00 and 08:00Z, are the same value.
    """
    if all(getattr(todo, name) == value for name, value in changes.items()):
        return None
    return dataclasses.replace(todo, **changes)
