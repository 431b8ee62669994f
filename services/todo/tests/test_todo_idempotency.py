"""``Idempotency-Key``: a retried POST /todos never creates a second todo."""

from __future__ import annotations

import asyncio
import uuid

import aiopg


async def rows(db: aiopg.Pool, table: str) -> int:
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute(f"SELECT count(*) FROM {table}")
        (count,) = await cur.fetchone()
    return count


async def test_a_retry_with_the_same_key_gets_the_same_todo(client, alice, db):
    headers = {**alice.headers, "Idempotency-Key": uuid.uuid4().hex}
    first = await client.post("/todos", json={"title": "Once", "priority": "high"}, headers=headers)
    # The same JSON object, spelled differently.
    retry = await client.post(
        "/todos",
        data=b'{ "priority":"high",  "title":"Once" }',
        headers={**headers, "Content-Type": "application/json"},
    )

    assert first.status == retry.status == 201
    assert await first.json() == await retry.json()
    assert first.headers["Location"] == retry.headers["Location"]
    assert first.headers["ETag"] == retry.headers["ETag"]
    assert "Idempotent-Replayed" not in first.headers
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert await rows(db, "todos") == 1
    assert await rows(db, "outbox") == 1


async def test_reusing_a_key_for_another_body_is_refused(client, alice, db):
    headers = {**alice.headers, "Idempotency-Key": "order-42"}
    await client.post("/todos", json={"title": "First"}, headers=headers)

    reused = await client.post("/todos", json={"title": "Second"}, headers=headers)

    assert reused.status == 422
    assert (await reused.json())["code"] == "IDEMPOTENCY_KEY_REUSED"
    assert await rows(db, "todos") == 1


async def test_keys_belong_to_their_owner(client, alice, new_user, db):
    bob = new_user()
    key = {"Idempotency-Key": "same-key"}

    mine = await client.post("/todos", json={"title": "Same"}, headers={**alice.headers, **key})
    theirs = await client.post("/todos", json={"title": "Same"}, headers={**bob.headers, **key})

    assert mine.status == theirs.status == 201
    assert (await mine.json())["id"] != (await theirs.json())["id"]
    assert (await theirs.json())["owner"]["id"] == bob.id
    assert await rows(db, "todos") == 2


async def test_fifty_concurrent_requests_with_one_key_create_one_todo(client, alice, db):
    headers = {**alice.headers, "Idempotency-Key": uuid.uuid4().hex}
    body = {"title": "Exactly once", "due_at": "2030-01-01T00:00:00Z"}

    responses = await asyncio.gather(*(client.post("/todos", json=body, headers=headers) for _ in range(50)))

    answers = [(resp.status, await resp.json()) for resp in responses]
    assert all(answer == answers[0] for answer in answers)
    assert answers[0][0] == 201
    assert await rows(db, "todos") == 1
    assert await rows(db, "outbox") == 1
    assert sum("Idempotent-Replayed" not in resp.headers for resp in responses) == 1
