"""The SQL for todos. Every function runs on the caller's cursor.

Which transaction a statement belongs to is decided by the caller (todos.py),
so that a change and its outbox event always commit together. Every query
names the owner: a todo is only ever found through its owner's id.
"""

from __future__ import annotations

from typing import Any

from .model import ListQuery, NewTodo, Todo

COLUMNS = "id, owner_id, title, description, due_at, priority, completed, completed_at, version, created_at, updated_at"


def _todo(row: tuple[Any, ...]) -> Todo:
    todo_id, owner_id, *rest = row
    return Todo(str(todo_id), str(owner_id), *rest)


async def insert_todo(cur: Any, owner_id: str, new: NewTodo) -> Todo:
    """Stamped with ``clock_timestamp()``, as ``save_todo`` is, not ``now()``, under the owner's create lock.

    ``now()`` is when the transaction began: a create that first waited on an
    idempotency key's lock would sort among todos committed before it, into
    a page a client has already read (mesh_common.cursors). Read once, for
    both ``created_at`` and ``updated_at``.

    The stamp is still taken before the commit (the event, the stored
    response and the commit's flush come between), so two creates of one
    owner could commit in the other order than they were stamped: a page
    read between the two commits shows the later stamp, and the earlier,
    committed after, sorts behind its cursor, never shown. Held until the
    commit, the owner's lock makes each create of an owner stamp after the
    last one committed; a list only ever shows one owner's todos.
    """
    await cur.execute("SELECT pg_advisory_xact_lock(hashtextextended('todo-owner-creates:' || %s, 0))", (owner_id,))
    await cur.execute(
        "INSERT INTO todos (owner_id, title, description, due_at, priority, created_at, updated_at)"
        " SELECT %s, %s, %s, %s, %s, clock.now, clock.now FROM (SELECT clock_timestamp() AS now) AS clock"
        f" RETURNING {COLUMNS}",
        (owner_id, new.title, new.description, new.due_at, new.priority),
    )
    return _todo(await cur.fetchone())


async def find_todo(cur: Any, owner_id: str, todo_id: str, *, for_update: bool = False) -> Todo | None:
    lock = " FOR UPDATE" if for_update else ""
    await cur.execute(f"SELECT {COLUMNS} FROM todos WHERE id = %s AND owner_id = %s{lock}", (todo_id, owner_id))
    row = await cur.fetchone()
    return _todo(row) if row is not None else None


async def save_todo(cur: Any, todo: Todo) -> Todo:
    """Write ``todo``'s fields back as a new version of it; the caller holds its lock (``for_update``).

    Stamped with ``clock_timestamp()``, read once the lock is held, not with
    ``now()``: that is when the transaction began, before it waited for the
    lock, so a change that waited for another would be stamped before it,
    and ``updated_at`` would go backwards as the version went up. Read once,
    so that the change that completes a todo gives it one time for both.
    """
    await cur.execute(
        "UPDATE todos SET title = %s, description = %s, due_at = %s, priority = %s, completed = %s,"
        " completed_at = CASE WHEN %s THEN coalesce(completed_at, clock.now) END,"
        " version = version + 1, updated_at = clock.now"
        " FROM (SELECT clock_timestamp() AS now) AS clock"
        f" WHERE id = %s AND owner_id = %s RETURNING {COLUMNS}",
        (
            todo.title,
            todo.description,
            todo.due_at,
            todo.priority,
            todo.completed,
            todo.completed,
            todo.id,
            todo.owner_id,
        ),
    )
    return _todo(await cur.fetchone())


async def delete_todo(cur: Any, todo: Todo) -> None:
    await cur.execute("DELETE FROM todos WHERE id = %s AND owner_id = %s", (todo.id, todo.owner_id))


def escape_like(text: str) -> str:
    """``text`` matched literally by LIKE: its wildcards lose their meaning."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


async def list_todos(cur: Any, owner_id: str, query: ListQuery) -> list[Todo]:
    """Up to ``query.limit + 1`` todos: the extra one says whether a next page exists."""
    where: list[str] = ["owner_id = %s"]
    params: list[Any] = [owner_id]
    if query.completed is not None:
        where.append("completed = %s")
        params.append(query.completed)
    if query.due_before is not None:
        where.append("due_at < %s")
        params.append(query.due_before)
    if query.title_contains is not None:
        where.append("title ILIKE %s ESCAPE '\\'")
        params.append(f"%{escape_like(query.title_contains)}%")
    if query.after is not None:
        # A row comparison, which the (owner_id, created_at DESC, id DESC) index serves.
        where.append("(created_at, id) < (%s, %s)")
        params.extend(query.after)
    await cur.execute(
        f"SELECT {COLUMNS} FROM todos WHERE {' AND '.join(where)} ORDER BY created_at DESC, id DESC LIMIT %s",
        (*params, query.limit + 1),
    )
    return [_todo(row) for row in await cur.fetchall()]
