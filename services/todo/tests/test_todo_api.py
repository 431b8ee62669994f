"""The todo API, end to end through the app, on the real database."""

from __future__ import annotations

import json
import uuid

import aiopg
import pytest
from multidict import CIMultiDict

from todo_service.events import EVENT_TYPES

from .conftest import create


async def test_creating_a_todo_answers_201_with_location_etag_and_defaults(client, alice):
    resp = await client.post(
        "/todos", json={"title": "  Write the report  ", "due_at": "2030-05-01T09:30:00+02:00"}, headers=alice.headers
    )

    assert resp.status == 201
    todo = await resp.json()
    assert resp.headers["Location"] == f"todos/{todo['id']}"
    assert resp.headers["ETag"] == 'W/"1"'
    assert todo["title"] == "Write the report"
    assert todo["due_at"] == "2030-05-01T07:30:00+00:00"
    assert todo["priority"] == "normal"
    assert todo["description"] is None
    assert todo["completed"] is False and todo["completed_at"] is None
    assert todo["version"] == 1
    assert todo["owner"] == {"id": alice.id, "display_name": None}
    got = await client.get(f"/todos/{todo['id']}", headers=alice.headers)
    assert got.status == 200
    assert await got.json() == todo
    assert got.headers["ETag"] == 'W/"1"'


async def test_patch_changes_only_the_given_fields_and_bumps_the_version(client, alice):
    todo = await create(client, alice, description="two litres", due_at="2030-01-01T00:00:00Z")

    resp = await client.patch(f"/todos/{todo['id']}", json={"priority": "high", "due_at": None}, headers=alice.headers)

    assert resp.status == 200
    changed = await resp.json()
    assert resp.headers["ETag"] == 'W/"2"'
    assert changed["version"] == 2
    assert changed["priority"] == "high"
    assert changed["due_at"] is None
    assert changed["title"] == todo["title"] and changed["description"] == "two litres"
    assert changed["updated_at"] > todo["updated_at"]


async def test_a_stale_if_match_is_refused_with_412_and_changes_nothing(client, alice):
    todo = await create(client, alice)
    first = await client.patch(
        f"/todos/{todo['id']}", json={"title": "Buy oat milk"}, headers={**alice.headers, "If-Match": 'W/"1"'}
    )
    assert first.status == 200

    for method, path, body in (
        ("PATCH", "", {"title": "Buy cow milk"}),
        ("POST", "/complete", None),
        ("DELETE", "", None),
    ):
        stale = await client.request(
            method, f"/todos/{todo['id']}{path}", json=body, headers={**alice.headers, "If-Match": 'W/"1"'}
        )
        assert stale.status == 412, method + path
        assert (await stale.json())["code"] == "PRECONDITION_FAILED"

    current = await (await client.get(f"/todos/{todo['id']}", headers=alice.headers)).json()
    assert current["title"] == "Buy oat milk"
    assert current["version"] == 2
    assert current["completed"] is False


async def test_if_match_accepts_the_current_tag_weak_strong_or_any(client, alice):
    todo = await create(client, alice)
    for version, if_match in ((1, 'W/"1"'), (2, '"2"'), (3, '"41", W/"3"'), (4, "*")):
        resp = await client.patch(
            f"/todos/{todo['id']}", json={"title": f"v{version + 1}"}, headers={**alice.headers, "If-Match": if_match}
        )
        assert resp.status == 200, if_match
        assert resp.headers["ETag"] == f'W/"{version + 1}"'


async def test_if_match_on_several_lines_is_one_list(client, alice):
    todo = await create(client, alice)
    await client.patch(f"/todos/{todo['id']}", json={"title": "v2"}, headers=alice.headers)
    headers = CIMultiDict({**alice.headers})
    headers.add("If-Match", 'W/"1"')
    headers.add("If-Match", 'W/"2"')  # the current one, on the second line
    resp = await client.patch(f"/todos/{todo['id']}", json={"title": "v3"}, headers=headers)
    assert resp.status == 200, await resp.text()
    assert resp.headers["ETag"] == 'W/"3"'


async def test_if_match_with_empty_members_and_a_comma_in_a_tag_is_read_as_a_list(client, alice):
    todo = await create(client, alice)
    resp = await client.patch(
        f"/todos/{todo['id']}", json={"title": "v2"}, headers={**alice.headers, "If-Match": ', "a,b" ,, W/"1" ,'}
    )
    assert resp.status == 200, await resp.text()


@pytest.mark.parametrize("if_match", ["1", "W/1", 'w/"1"', '"1" "2"', '"1', '*, W/"1"', "", " , "])
async def test_an_if_match_that_is_no_entity_tag_is_refused_and_nothing_changes(client, alice, if_match):
    # Read as matching nothing, it made a 412 "changed since you read it",
    # which the same request, after fetching the todo, met again for ever.
    todo = await create(client, alice)
    for method, path, body in (("PATCH", "", {"title": "v2"}), ("POST", "/complete", None), ("DELETE", "", None)):
        resp = await client.request(
            method, f"/todos/{todo['id']}{path}", json=body, headers={**alice.headers, "If-Match": if_match}
        )
        assert resp.status == 422, method + path
        problem = await resp.json()
        assert problem["code"] == "VALIDATION_FAILED"
        assert [e["field"] for e in problem["errors"]] == ["If-Match"]
    current = await (await client.get(f"/todos/{todo['id']}", headers=alice.headers)).json()
    assert (current["version"], current["title"]) == (1, todo["title"])


async def test_completing_twice_changes_the_todo_once(client, alice):
    todo = await create(client, alice)

    first = await client.post(f"/todos/{todo['id']}/complete", headers=alice.headers)
    again = await client.post(f"/todos/{todo['id']}/complete", headers=alice.headers)

    assert first.status == again.status == 200
    completed = await first.json()
    assert completed["completed"] is True and completed["completed_at"] is not None
    assert completed["version"] == 2
    assert await again.json() == completed

    reopened = await (await client.post(f"/todos/{todo['id']}/reopen", headers=alice.headers)).json()
    assert reopened["completed"] is False and reopened["completed_at"] is None
    assert reopened["version"] == 3
    again = await (await client.post(f"/todos/{todo['id']}/reopen", headers=alice.headers)).json()
    assert again["version"] == 3


async def test_a_deleted_todo_is_gone(client, alice):
    todo = await create(client, alice)

    resp = await client.delete(f"/todos/{todo['id']}", headers=alice.headers)

    assert resp.status == 204
    for method in ("GET", "DELETE"):
        gone = await client.request(method, f"/todos/{todo['id']}", headers=alice.headers)
        assert gone.status == 404
        assert (await gone.json())["code"] == "TODO_NOT_FOUND"


async def test_the_list_pages_newest_first_with_an_opaque_cursor(client, alice, new_user):
    created = [(await create(client, alice, title=f"todo {n}"))["id"] for n in range(25)]
    await create(client, new_user(), title="someone else's")

    seen, cursor, pages = [], None, []
    for _ in range(20):  # bounded: 25 rows are 3 pages
        params = {"limit": "10", **({"cursor": cursor} if cursor else {})}
        resp = await client.get("/todos", params=params, headers=alice.headers)
        assert resp.status == 200
        page = await resp.json()
        pages.append(len(page["items"]))
        seen += [todo["id"] for todo in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert pages == [10, 10, 5]
    assert seen == list(reversed(created))


async def test_the_page_size_defaults_to_20_and_is_capped_at_100(client, alice, db: aiopg.Pool):
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "INSERT INTO todos (owner_id, title) SELECT %s, 'todo ' || n FROM generate_series(1, 130) AS n",
            (alice.id,),
        )

    default = await (await client.get("/todos", headers=alice.headers)).json()
    capped = await (await client.get("/todos", params={"limit": "1000"}, headers=alice.headers)).json()

    assert len(default["items"]) == 20 and default["next_cursor"] is not None
    assert len(capped["items"]) == 100 and capped["next_cursor"] is not None

    # All 130 share one created_at (one INSERT): paging goes by (created_at,
    # id), so every page follows on from the last, with no row twice or missed.
    seen: list[str] = []
    cursor = None
    for _ in range(10):  # bounded: 130 rows are 7 pages of 20
        params: dict[str, str] = {"cursor": cursor} if cursor else {}
        page = await (await client.get("/todos", params=params, headers=alice.headers)).json()
        seen += [todo["id"] for todo in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 130


async def test_the_list_filters_by_completion_due_date_and_title(client, alice):
    soon = await create(client, alice, title="Pay rent", due_at="2030-01-01T00:00:00Z")
    later = await create(client, alice, title="Pay 100% of taxes", due_at="2031-01-01T00:00:00Z")
    done = await create(client, alice, title="Renew_passport")
    await client.post(f"/todos/{done['id']}/complete", headers=alice.headers)
    await create(client, alice, title="Pay 1000 to Bob")
    await create(client, alice, title="Renew passport")

    async def ids(**params: str) -> set[str]:
        resp = await client.get("/todos", params=params, headers=alice.headers)
        assert resp.status == 200
        return {todo["id"] for todo in (await resp.json())["items"]}

    assert await ids(completed="true") == {done["id"]}
    assert done["id"] not in await ids(completed="false")
    assert await ids(due_before="2030-06-01T00:00:00Z") == {soon["id"]}
    assert await ids(due_before="2032-01-01T00:00:00+01:00") == {soon["id"], later["id"]}
    assert await ids(q="pay") == await ids(q="PAY") != set()
    # Wildcards are matched literally: "100%" is not "100 followed by anything".
    assert await ids(q="100%") == {later["id"]}
    assert await ids(q="w_p") == {done["id"]}
    assert await ids(q="pay", completed="false", due_before="2030-06-01T00:00:00Z") == {soon["id"]}


async def test_every_change_commits_its_event_with_the_todo_snapshot(client, alice, db: aiopg.Pool):
    todo = await create(client, alice, due_at="2030-01-01T08:00:00Z")
    request_id = "req-" + uuid.uuid4().hex
    headers = {**alice.headers, "X-Request-ID": request_id}
    await client.patch(f"/todos/{todo['id']}", json={"due_at": "2030-02-01T08:00:00Z"}, headers=headers)
    await client.post(f"/todos/{todo['id']}/complete", headers=headers)
    await client.post(f"/todos/{todo['id']}/reopen", headers=headers)
    await client.delete(f"/todos/{todo['id']}", headers=headers)

    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT routing_key, payload, correlation_id FROM outbox ORDER BY created_at")
        rows = await cur.fetchall()

    events = [json.loads(bytes(payload)) for _, payload, _ in rows]
    assert (
        [key for key, _, _ in rows]
        == [event["type"] for event in events]
        == ["todo.created", "todo.updated", "todo.completed", "todo.reopened", "todo.deleted"]
    )
    assert set(event["type"] for event in events) == set(EVENT_TYPES)
    assert [event["data"]["version"] for event in events] == [1, 2, 3, 4, 4]
    assert [event["data"]["due_at"] for event in events] == ["2030-01-01T08:00:00+00:00"] + 4 * [
        "2030-02-01T08:00:00+00:00"
    ]
    for event, (_, _, correlation_id) in zip(events, rows, strict=True):
        assert event["user_id"] == event["data"]["owner_id"] == alice.id
        assert event["data"]["id"] == todo["id"] and event["data"]["title"] == "Buy milk"
        assert event["version"] == 1 and event["occurred_at"]
        assert event["correlation_id"] == correlation_id
    assert [event["correlation_id"] for event in events[1:]] == 4 * [request_id]


async def test_the_relay_publishes_committed_events_persistently(client, alice, event_tap):
    tap = await event_tap("todo.*")
    request_id = "req-" + uuid.uuid4().hex

    todo = await (
        await client.post("/todos", json={"title": "Ship it"}, headers={**alice.headers, "X-Request-ID": request_id})
    ).json()

    message = await tap.next()
    event = json.loads(message.body)
    assert message.routing_key == event["type"] == "todo.created"
    assert message.message_id == event["id"]
    assert message.correlation_id == event["correlation_id"] == request_id
    assert message.delivery_mode == 2  # persistent
    assert event["data"]["id"] == todo["id"]
