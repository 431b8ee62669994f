"""GET /notifications: the signed-in user's own history, newest first, a page at a time."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aiopg
import pytest
from notification_support import (
    Broker,
    Client,
    FakeUserService,
    eventually,
    new_user,
    todo_event,
    verification_requested,
)
from smtp_sink import SmtpSink

from mesh_common.testing import TokenFactory
from notification_service import repository
from notification_service.failures import DatabaseUnavailable
from notification_service.keys import CONSUMER


async def test_history_needs_a_valid_user_token(service: Client, tokens: TokenFactory) -> None:
    async with service.get("/notifications") as resp:
        assert resp.status == 401
        assert resp.content_type == "application/problem+json"
        assert (await resp.json())["code"] == "UNAUTHORIZED"
    async with service.get("/notifications", headers={"Authorization": "Bearer not.a.token"}) as resp:
        assert resp.status == 401
        assert (await resp.json())["code"] == "INVALID_TOKEN"
    other_issuer = TokenFactory()
    async with service.get("/notifications", headers=other_issuer.headers(str(uuid.uuid4()))) as resp:
        assert (resp.status, (await resp.json())["code"]) == (401, "INVALID_TOKEN")
    # A service token is not a user: it has no history. Valid, but not for this: 403.
    async with service.get("/notifications", headers=tokens.headers("service:todo-service")) as resp:
        assert (resp.status, (await resp.json())["code"]) == (403, "FORBIDDEN")


async def test_history_lists_the_users_own_notifications_newest_first(
    service: Client, broker: Broker, smtp: SmtpSink, users: FakeUserService, tokens: TokenFactory
) -> None:
    me = users.add(new_user())
    someone_else = new_user()
    code = verification_requested(me)
    await broker.publish(code)
    await eventually(lambda: smtp.to(me["email"]), within=10, what="the verification email")
    done = todo_event("completed", me["id"], {"id": "t1", "title": "Ship it", "completed": True})
    await broker.publish(done)
    await broker.publish(verification_requested(someone_else))
    await eventually(lambda: service.app[CONSUMER].settled["acked"] == 3, within=10, what="all events handled")

    async with service.get("/notifications", headers=tokens.headers(me["id"])) as resp:
        assert resp.status == 200
        body = await resp.json()

    assert body["next_cursor"] is None
    assert [(n["kind"], n["event_id"], n["subject"]) for n in body["items"]] == [
        ("todo_completed", done.id, "Done: Ship it"),
        ("verify_email", code.id, "Confirm your email address for todo-mesh"),
    ]
    assert {n["recipient"] for n in body["items"]} == {me["email"]}
    assert all(datetime.fromisoformat(n["sent_at"]).tzinfo for n in body["items"])


async def test_history_pages_with_a_cursor_without_gaps_or_repeats(
    service: Client, pool: aiopg.Pool, tokens: TokenFactory
) -> None:
    me = str(uuid.uuid4())
    # Two share a timestamp: the cursor must still tell them apart.
    start = datetime(2026, 1, 1, tzinfo=UTC)
    moments = [start + timedelta(minutes=m) for m in (0, 1, 2, 2, 3)]
    await _insert_sent(pool, me, moments)
    await _insert_sent(pool, str(uuid.uuid4()), moments)  # another user's

    seen: list[str] = []
    pages = []
    cursor = None
    for _ in range(50):  # bounded: a cursor that never ends fails below, not by hanging
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        async with service.get("/notifications", params=params, headers=tokens.headers(me)) as resp:
            assert resp.status == 200
            body = await resp.json()
        pages.append(len(body["items"]))
        seen.extend(n["sent_at"] for n in body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            break

    assert pages == [2, 2, 1]
    assert seen == sorted(seen, reverse=True)
    assert sorted(datetime.fromisoformat(s) for s in seen) == moments


async def test_a_bad_limit_or_cursor_is_a_422_problem(service: Client, tokens: TokenFactory) -> None:
    headers = tokens.headers(str(uuid.uuid4()))
    foreign_cursors = [
        "bm90IGpzb24",  # "not json"
        _b64(b'["2030-01-01T00:00:00+00:00",1]'),  # the right length, the wrong shape
        _b64(b"[" * 300),  # nested deep enough to trouble json.loads
        "A" * 600,  # longer than any cursor we give out
    ]
    bad = [{"limit": "0"}, {"limit": "101"}, {"limit": "ten"}, {"limit": "²"}, {"limit": "1" * 5000}]
    for params in [*bad, *({"cursor": c} for c in foreign_cursors)]:
        async with service.get("/notifications", params=params, headers=headers) as resp:
            assert resp.status == 422, params
            body = await resp.json()
            assert body["code"] == "VALIDATION_FAILED"
            assert body["errors"][0]["field"] in {"limit", "cursor"}


@pytest.mark.parametrize(
    ("query", "field", "message"),
    [("limt=5", "limt", "is not a known parameter"), ("limit=5&limit=50", "limit", "must be given once")],
)
async def test_a_parameter_misspelt_or_given_twice_is_a_422_problem(
    service: Client, tokens: TokenFactory, query: str, field: str, message: str
) -> None:
    # Ignored, the first answered a default page the client did not ask for,
    # and of the second each reader could take another value; the todo list
    # refuses both.
    async with service.get(f"/notifications?{query}", headers=tokens.headers(str(uuid.uuid4()))) as resp:
        assert resp.status == 422
        assert (await resp.json())["errors"] == [{"field": field, "message": message}]


async def test_the_openapi_description_is_public_and_3_1(service: Client) -> None:
    async with service.get("/openapi.json") as resp:
        assert resp.status == 200
        doc: dict[str, Any] = await resp.json()
    assert doc["openapi"].startswith("3.1")
    assert "get" in doc["paths"]["/notifications"]


async def _insert_sent(pool: aiopg.Pool, user_id: str, moments: list[datetime]) -> None:
    async with pool.acquire() as conn, conn.cursor() as cur:
        for n, sent_at in enumerate(moments):
            await cur.execute(
                "INSERT INTO notifications (event_id, kind, user_id, recipient, subject, message_id, status, sent_at)"
                " VALUES (%s, 'welcome', %s, 'a@example.test', %s, '<x@y>', 'sent', %s)",
                (str(uuid.uuid4()), user_id, f"Subject {n}", sent_at),
            )


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


async def test_history_with_the_database_away_is_a_503_to_retry(
    service: Client, tokens: TokenFactory, monkeypatch: Any
) -> None:
    async def away(*args: Any, **kwargs: Any) -> None:
        raise DatabaseUnavailable("QueryCanceledError")  # what the repository makes of any database outage

    monkeypatch.setattr(repository, "sent_notifications", away)
    async with service.get("/notifications", headers=tokens.headers(str(uuid.uuid4()))) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        assert (await resp.json())["code"] == "DEPENDENCY_UNAVAILABLE"
