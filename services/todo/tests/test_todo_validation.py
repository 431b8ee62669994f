"""What the API refuses, and how: 401 without a user token, 422 with every error listed."""

from __future__ import annotations

import base64
import dataclasses
import json
import uuid
from datetime import datetime

import aiopg
import pytest
from aiohttp import ClientResponse

from mesh_common.testing import LeavesConsulFirst
from todo_service.app import create_app


async def errors_of(resp: ClientResponse) -> dict[str, str]:
    assert resp.status == 422, await resp.text()
    assert resp.content_type == "application/problem+json"
    body = await resp.json()
    assert body["code"] == "VALIDATION_FAILED"
    return {error["field"]: error["message"] for error in body["errors"]}


async def count_todos(db: aiopg.Pool) -> int:
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT count(*) FROM todos")
        (count,) = await cur.fetchone()
    return count


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "title"),
        ({"title": ""}, "title"),
        ({"title": "   "}, "title"),
        ({"title": "x" * 201}, "title"),
        ({"title": 42}, "title"),
        ({"title": "ok", "description": "x" * 2001}, "description"),
        ({"title": "ok", "priority": "urgent"}, "priority"),
        ({"title": "ok", "due_at": "2030-01-01"}, "due_at"),
        ({"title": "ok", "due_at": "2030-01-01T10:00:00"}, "due_at"),  # no time zone
        ({"title": "ok", "due_at": "2030-01-31T09:00:00+00:99"}, "due_at"),  # read as +01:39, 07:21Z
        ({"title": "ok", "due_at": "2030-01-31T09:00:00-00:60"}, "due_at"),
        ({"title": "ok", "due_at": "2030-02-30T10:00:00Z"}, "due_at"),
        ({"title": "ok", "due_at": "next tuesday"}, "due_at"),
        ({"title": "ok", "due_at": 1893456000}, "due_at"),
        ({"title": "ok", "owner_id": "00000000-0000-0000-0000-000000000000"}, "owner_id"),
        ({"title": "ok", "completed": True}, "completed"),
    ],
)
async def test_an_invalid_todo_is_refused_with_the_field_named(client, alice, db, body, field):
    errors = await errors_of(await client.post("/todos", json=body, headers=alice.headers))

    assert list(errors) == [field]
    assert await count_todos(db) == 0


async def test_every_error_in_a_body_is_reported_at_once(client, alice):
    body = {"title": "x" * 201, "due_at": "tomorrow", "priority": "meh", "colour": "red"}

    errors = await errors_of(await client.post("/todos", json=body, headers=alice.headers))

    assert errors == {
        "colour": "is not a known field",
        "title": "must be 1 to 200 characters long",
        "due_at": "must be an RFC 3339 date-time with a time zone, like 2030-01-31T09:00:00Z",
        "priority": "must be one of low, normal, high",
    }


async def test_a_body_that_is_not_a_json_object_is_refused(client, alice):
    not_json = await client.post(
        "/todos", data=b"{title", headers={**alice.headers, "Content-Type": "application/json"}
    )
    a_list = await client.post("/todos", json=["title"], headers=alice.headers)
    form = await client.post("/todos", data={"title": "x"}, headers=alice.headers)

    assert not_json.status == a_list.status == 422
    assert form.status == 415


async def test_an_invalid_patch_changes_nothing(client, alice):
    todo = await (await client.post("/todos", json={"title": "Keep me"}, headers=alice.headers)).json()

    empty = await errors_of(await client.patch(f"/todos/{todo['id']}", json={}, headers=alice.headers))
    unknown = await errors_of(await client.patch(f"/todos/{todo['id']}", json={"version": 9}, headers=alice.headers))
    null_title = await errors_of(
        await client.patch(f"/todos/{todo['id']}", json={"title": None}, headers=alice.headers)
    )

    assert list(empty) == ["body"] and list(unknown) == ["version"] and list(null_title) == ["title"]
    current = await (await client.get(f"/todos/{todo['id']}", headers=alice.headers)).json()
    assert current == todo


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=0", "limit"),
        ("limit=-5", "limit"),
        ("limit=ten", "limit"),
        ("completed=yes", "completed"),
        ("due_before=2030-01-01", "due_before"),
        ("cursor=not-a-cursor", "cursor"),
        ("cursor=WyJ4IiwieSJd", "cursor"),  # base64 of ["x","y"]: well-formed, but not ours
        ("q=", "q"),
        ("sort=title", "sort"),
        ("limit=5&limit=6", "limit"),
    ],
)
async def test_an_invalid_list_query_is_refused(client, alice, query, field):
    errors = await errors_of(await client.get(f"/todos?{query}", headers=alice.headers))

    assert list(errors) == [field]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer not-a-token"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
    ],
)
async def test_every_todo_route_needs_a_valid_token(client, headers):
    for method, path in (("GET", "/todos"), ("POST", "/todos"), ("GET", "/todos/x"), ("DELETE", "/todos/x")):
        resp = await client.request(method, path, headers=headers)
        assert resp.status == 401, (method, path)
        assert resp.content_type == "application/problem+json"


async def test_a_token_for_another_issuer_or_for_a_service_is_refused(client, tokens):
    foreign = await client.get("/todos", headers=tokens.headers(str(uuid.uuid4()), iss="someone-else"))
    service = await client.get("/todos", headers=tokens.headers("service:notification-service"))
    not_a_user_id = await client.get("/todos", headers=tokens.headers("alice"))

    assert foreign.status == not_a_user_id.status == 401
    # A service's token is valid, but not a user's: 403, not "authenticate again".
    assert service.status == 403


async def test_an_oversized_body_is_a_413_and_nothing_is_written(client, alice, db):
    body = json.dumps({"title": "big", "description": "x" * (70 * 1024)})
    resp = await client.post("/todos", data=body, headers={**alice.headers, "Content-Type": "application/json"})
    assert resp.status == 413
    assert resp.content_type == "application/problem+json"
    assert (await resp.json())["code"] == "PAYLOAD_TOO_LARGE"
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT count(*) FROM todos")
        assert await cur.fetchone() == (0,)


async def test_a_bad_idempotency_key_is_refused(client, alice, db):
    resp = await client.post("/todos", json={"title": "x"}, headers={**alice.headers, "Idempotency-Key": "x" * 256})

    assert list(await errors_of(resp)) == ["Idempotency-Key"]
    assert await count_todos(db) == 0


def cursor_of(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


# PostgreSQL cannot store NUL in text, and a lone surrogate is not UTF-8: both
# used to reach the driver (or the idempotency hash) and come back as a 500.
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"title": "nul\x00inside"}, "title"),
        ({"title": "\ud800"}, "title"),
        ({"title": "ok", "description": "nul\x00inside"}, "description"),
        ({"title": "ok", "description": "lone \udfff surrogate"}, "description"),
    ],
)
async def test_text_postgres_cannot_store_is_refused(client, alice, db, body, field):
    created = await client.post("/todos", json=body, headers=alice.headers)
    keyed = await client.post("/todos", json=body, headers={**alice.headers, "Idempotency-Key": uuid.uuid4().hex})
    todo = await (await client.post("/todos", json={"title": "Keep me"}, headers=alice.headers)).json()
    patched = await client.patch(f"/todos/{todo['id']}", json={field: body[field]}, headers=alice.headers)

    for resp in (created, keyed, patched):
        assert list(await errors_of(resp)) == [field]
    assert await count_todos(db) == 1


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=%C2%B2", "limit"),  # "²": str.isdigit() says yes, int() says no
        ("limit=%D9%A3", "limit"),  # an Arabic-Indic three
        ("limit=" + "9" * 5000, "limit"),  # past int()'s digit limit
        ("q=nul%00inside", "q"),
        ("cursor=" + cursor_of(["2024-01-01T00:00:00+00:00", 1]), "cursor"),
        ("cursor=" + base64.urlsafe_b64encode(b"[" * 3000).decode(), "cursor"),  # json.loads recursion
        ("cursor=" + cursor_of(["0001-01-01T00:00:00+20:00", str(uuid.uuid4())]), "cursor"),  # before year 1 in UTC
    ],
)
async def test_a_list_query_that_used_to_500_is_refused(client, alice, query, field):
    errors = await errors_of(await client.get(f"/todos?{query}", headers=alice.headers))

    assert list(errors) == [field]


@pytest.mark.parametrize("offset", ["+20:00", "-23:59:59.999999"])
async def test_a_cursor_with_an_offset_postgres_refuses_names_the_same_instant_in_utc(client, alice, offset):
    # Python's fromisoformat takes these; PostgreSQL refused them, as a 500.
    cursor = cursor_of([f"2024-01-01T00:00:00{offset}", str(uuid.uuid4())])
    resp = await client.get(f"/todos?cursor={cursor}", headers=alice.headers)
    assert resp.status == 200, await resp.text()


async def test_a_large_limit_is_still_served_as_the_maximum(client, alice):
    resp = await client.get("/todos?limit=" + "9" * 10, headers=alice.headers)

    assert resp.status == 200


async def test_the_latest_due_date_is_kept_whatever_the_servers_time_zone(aiohttp_client, settings, tokens, alice, db):
    # A server set east of UTC would hand 9999-12-31T23:59:59Z back as the
    # year 10000, which psycopg2 cannot read: the service keeps its sessions in UTC.
    berlin = f"{settings.database_url}?options=-c%20timezone%3DEurope/Berlin"
    client = await aiohttp_client(
        LeavesConsulFirst(create_app(dataclasses.replace(settings, database_url=berlin), verifier=tokens.verifier()))
    )
    for due in ("9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z"):
        resp = await client.post("/todos", json={"title": "far off", "due_at": due}, headers=alice.headers)
        assert resp.status == 201, await resp.text()
        assert datetime.fromisoformat((await resp.json())["due_at"]) == datetime.fromisoformat(due)


async def test_a_bad_idempotency_key_is_reported_with_the_bodys_errors(client, alice, db):
    resp = await client.post("/todos", json={}, headers={**alice.headers, "Idempotency-Key": "has space"})

    assert set(await errors_of(resp)) == {"title", "Idempotency-Key"}
    assert await count_todos(db) == 0
