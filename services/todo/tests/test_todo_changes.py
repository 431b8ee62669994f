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

from mesh_common import outbox
from mesh_common.problems import DependencyUnavailable
from todo_service import idempotency, repository, todos
from todo_service.idempotency import IdempotentRequest
from todo_service.keys import OWNERS, TODOS
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


async def test_a_create_that_waited_is_stamped_after_the_todos_committed_meanwhile(
    client: Client, alice: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stamped when its transaction began, before it waited on its key, it
    # sorted behind a todo committed meanwhile: below a cursor a client
    # holding the newest page had, so paging on never showed it.
    claim_key = idempotency.claim_key
    began, other_done = asyncio.Event(), asyncio.Event()

    async def slow_to_claim_once(cur: Any, owner_id: str, request: IdempotentRequest) -> bool:
        if not began.is_set():
            began.set()
            async with asyncio.timeout(10):
                await other_done.wait()
        return await claim_key(cur, owner_id, request)

    monkeypatch.setattr(idempotency, "claim_key", slow_to_claim_once)
    keyed = {**alice.headers, "Idempotency-Key": "late-1"}
    late_create = asyncio.create_task(client.post("/todos", json={"title": "late"}, headers=keyed))
    async with asyncio.timeout(10):
        await began.wait()
    on_time = await (await client.post("/todos", json={"title": "on time"}, headers=alice.headers)).json()
    other_done.set()
    late = await (await late_create).json()

    assert datetime.fromisoformat(late["created_at"]) > datetime.fromisoformat(on_time["created_at"])
    assert late["updated_at"] == late["created_at"]
    newest = await (await client.get("/todos?limit=1", headers=alice.headers)).json()
    assert [t["title"] for t in newest["items"]] == ["late"]


async def test_a_page_read_while_two_creates_commit_skips_neither(
    client: Client, alice: User, db: aiopg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A create stamped before another but committed after it sorted behind
    # the cursor of a page read between the two commits: paging on from
    # that page never showed it.
    for title in ("w", "z"):
        assert (await client.post("/todos", json={"title": title}, headers=alice.headers)).status == 201
    enqueue = outbox.enqueue  # what todos.py calls by that name
    inserted, go_on = asyncio.Event(), asyncio.Event()

    async def held_before_commit_once(cur: Any, event: Any) -> None:
        if not inserted.is_set():
            inserted.set()  # stamped, not yet committed
            async with asyncio.timeout(10):
                await go_on.wait()
        await enqueue(cur, event)

    monkeypatch.setattr(todos, "enqueue", held_before_commit_once)
    x = asyncio.create_task(client.post("/todos", json={"title": "x"}, headers=alice.headers))
    async with asyncio.timeout(10):
        await inserted.wait()
    y = asyncio.create_task(client.post("/todos", json={"title": "y"}, headers=alice.headers))
    async with asyncio.timeout(10):  # y committed, or waits for x to
        while not y.done() and not await waiting_for_a_lock(db):
            await asyncio.sleep(0.01)
    first = await (await client.get("/todos?limit=2", headers=alice.headers)).json()
    go_on.set()
    assert (await x).status == (await y).status == 201

    every = [t["title"] for t in (await (await client.get("/todos", headers=alice.headers)).json())["items"]]
    shown = [t["title"] for t in first["items"]]
    # Rows committed since come before the page, never among or after its rows.
    start = every.index(shown[0])
    assert every[start : start + len(shown)] == shown, (every, shown)


async def waiting_for_a_lock(db: aiopg.Pool) -> bool:
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "SELECT count(*) FROM pg_locks WHERE NOT granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        (waiting,) = await cur.fetchone()
    return bool(waiting)


async def test_a_list_that_fails_drops_its_owner_lookup(
    client: Client, alice: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Asked for at once with the page, the owner's name went on being looked
    # up, at the user-service, after the list had failed and been answered.
    dropped = asyncio.Event()

    async def slow_lookup(*args: Any, **kwargs: Any) -> Any:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            dropped.set()
            raise

    async def database_away(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0)  # the lookup has begun
        raise DependencyUnavailable(headers={"Retry-After": "1"})

    monkeypatch.setattr(client.app[OWNERS], "lookup", slow_lookup)
    monkeypatch.setattr(client.app[TODOS], "page", database_away)
    response = await client.get("/todos", headers=alice.headers)
    assert response.status == 503
    async with asyncio.timeout(5):
        await dropped.wait()
