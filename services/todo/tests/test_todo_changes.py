"""What a change to a todo leaves behind: its version, its ETag and its events."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Any

import aiopg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from todo_service import repository
from todo_service.model import Todo

from .conftest import User

Client = TestClient[web.Request, web.Application]


async def events_of(db: aiopg.Pool, todo_id: str) -> list[str]:
    """The types of the outbox's events about ``todo_id``, oldest first."""
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT routing_key, payload FROM outbox ORDER BY created_at")
        rows = await cur.fetchall()
    return [key for key, payload in rows if json.loads(bytes(payload))["data"]["id"] == todo_id]


async def patch(client: Client, user: User, todo_id: str, body: dict[str, Any], **headers: str) -> Any:
    return await client.patch(f"/todos/{todo_id}", json=body, headers={**user.headers, **headers})


async def test_a_patch_that_changes_nothing_is_a_no_op(client: Client, alice: User, db: aiopg.Pool) -> None:
    created = await client.post("/todos", json={"title": "a", "due_at": "2030-01-01T08:00:00Z"}, headers=alice.headers)
    todo = await created.json()

    # Equal once parsed: the title is trimmed, and the same instant in another offset.
    for body in ({"title": "a"}, {"title": "  a ", "priority": "normal", "due_at": "2030-01-01T09:00:00+01:00"}):
        resp = await patch(client, alice, todo["id"], body)
        assert resp.status == 200, await resp.text()
        assert resp.headers["ETag"] == created.headers["ETag"] == 'W/"1"'
        assert await resp.json() == todo

    assert await events_of(db, todo["id"]) == ["todo.created"]

    # The precondition still comes first: a stale If-Match is refused, even for a no-op.
    assert (await patch(client, alice, todo["id"], {"title": "b"})).status == 200
    stale = await patch(client, alice, todo["id"], {"title": "b"}, **{"If-Match": 'W/"1"'})
    assert stale.status == 412
    assert await events_of(db, todo["id"]) == ["todo.created", "todo.updated"]


@pytest.mark.parametrize("first", ["patch", "complete"])
async def test_a_change_that_waited_for_the_lock_is_stamped_after_the_one_it_waited_for(
    client: Client, alice: User, monkeypatch: pytest.MonkeyPatch, first: str
) -> None:
    todo = await (await client.post("/todos", json={"title": "a"}, headers=alice.headers)).json()
    find_todo = repository.find_todo
    began, second_done = asyncio.Event(), asyncio.Event()

    async def slow_to_lock_once(cur: Any, owner_id: str, todo_id: str, *, for_update: bool = False) -> Todo | None:
        # The first change's transaction has begun, and the second one
        # begins, locks and commits before the first takes the row's lock.
        if for_update and not began.is_set():
            began.set()
            async with asyncio.timeout(10):
                await second_done.wait()
        return await find_todo(cur, owner_id, todo_id, for_update=for_update)

    monkeypatch.setattr(repository, "find_todo", slow_to_lock_once)
    if first == "patch":
        first_change = asyncio.create_task(patch(client, alice, todo["id"], {"title": "A"}))
    else:
        first_change = asyncio.create_task(client.post(f"/todos/{todo['id']}/complete", headers=alice.headers))
    async with asyncio.timeout(10):
        await began.wait()
    second = await (await patch(client, alice, todo["id"], {"title": "B"})).json()
    second_done.set()
    later = await (await first_change).json()

    assert (second["version"], later["version"]) == (2, 3)
    assert datetime.fromisoformat(later["updated_at"]) >= datetime.fromisoformat(second["updated_at"])
    if first == "complete":
        assert later["completed_at"] == later["updated_at"]  # one change, one time
