"""Broken object-level authorization: can one user reach another's todos? No.

Alice tries every operation on Bob's real todo ids and on ids that exist for
nobody. Each attempt must answer 404 with the very same body, so that she
cannot even learn which ids exist, and Bob's todos must be left as they were.
"""

from __future__ import annotations

import uuid

import aiopg

OPERATIONS = (
    ("GET", "", None),
    ("PATCH", "", {"title": "pwned"}),
    ("DELETE", "", None),
    ("POST", "/complete", None),
    ("POST", "/reopen", None),
)


async def outbox_size(db: aiopg.Pool) -> int:
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT count(*) FROM outbox")
        (count,) = await cur.fetchone()
    return count


async def test_no_user_can_reach_another_users_todos(client, alice, new_user, db):
    bob = new_user()
    bobs = []
    for title in ("Bob's open todo", "Bob's done todo", "Bob's dated todo"):
        resp = await client.post("/todos", json={"title": title, "due_at": "2030-01-01T00:00:00Z"}, headers=bob.headers)
        bobs.append((await resp.json())["id"])
    await client.post(f"/todos/{bobs[1]}/complete", headers=bob.headers)
    await client.post("/todos", json={"title": "Alice's own"}, headers=alice.headers)
    bob_before = await (await client.get("/todos", headers=bob.headers)).json()
    events_before = await outbox_size(db)

    targets = [*bobs, *(str(uuid.uuid4()) for _ in range(3)), bobs[0].upper(), "not-a-uuid", "1"]
    attempts, answers = 0, []
    for todo_id in targets:
        for method, suffix, body in OPERATIONS:
            for if_match in (None, 'W/"1"', 'W/"99"'):
                headers = {**alice.headers, **({"If-Match": if_match} if if_match else {})}
                resp = await client.request(method, f"/todos/{todo_id}{suffix}", json=body, headers=headers)
                attempts += 1
                answers.append((resp.status, await resp.read()))

    granted = [status for status, _ in answers if status != 404]
    print(f"cross-user access: {len(granted)} of {attempts}")
    assert len(granted) == 0
    assert len(set(answers)) == 1, "a refusal must not tell a real id from a missing one"
    _, body = answers[0]
    assert b'"code": "TODO_NOT_FOUND"' in body
    assert await (await client.get("/todos", headers=bob.headers)).json() == bob_before
    assert await outbox_size(db) == events_before
    alices = await (await client.get("/todos", headers=alice.headers)).json()
    assert [todo["title"] for todo in alices["items"]] == ["Alice's own"]
    for todo_id in bobs:
        assert (await client.get(f"/todos/{todo_id}", headers=bob.headers)).status == 200
