"""Nobody can tell from our answers, or from how long they take, who has an account."""

from __future__ import annotations

import statistics
import time
import uuid

import aiopg
import pytest

from .conftest import Client, Login, Register

PASSWORD = "a long and unusual passphrase"
TRIES = 200
ACCOUNTS = 25  # 8 wrong passwords each stay under the 10-failure lock


async def test_duplicate_username_and_duplicate_email_get_the_same_answer(client: Client, register: Register) -> None:
    await register("ada", "ada@example.com")
    answers = []
    for body in (
        {"username": "ada", "email": "fresh@example.com", "password": PASSWORD},
        {"username": "fresh", "email": "ada@example.com", "password": PASSWORD},
    ):
        response = await client.post("/users", json=body)
        answers.append((response.status, await response.read()))
    assert answers[0] == answers[1]
    assert answers[0][0] == 409


async def test_unknown_user_and_wrong_password_get_the_same_answer(client: Client, register: Register) -> None:
    await register("ada")
    answers = []
    for username in ("ada", "nobody"):
        response = await client.post("/auth/login", json={"username": username, "password": "wrong password!"})
        answers.append((response.status, await response.read()))
    assert answers[0] == answers[1]
    assert answers[0][0] == 401


async def test_every_kind_of_bad_refresh_token_gets_the_same_answer(
    client: Client, register: Register, login: Login, db: aiopg.Pool
) -> None:
    await register()
    spent = (await login())["refresh_token"]
    await client.post("/auth/refresh", json={"refresh_token": spent})
    revoked = (await login())["refresh_token"]
    await client.post("/auth/logout", json={"refresh_token": revoked})
    expired = (await login())["refresh_token"]
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("UPDATE refresh_tokens SET expires_at = now() WHERE revoked_at IS NULL AND spent_at IS NULL")

    answers = set()
    for token in ("never-issued", spent, revoked, expired):
        response = await client.post("/auth/refresh", json={"refresh_token": token})
        answers.add((response.status, await response.read()))
    assert len(answers) == 1
    assert answers.pop()[0] == 401


async def test_a_wrong_password_takes_as_long_as_an_unknown_user(
    client: Client, register: Register, capsys: pytest.CaptureFixture[str]
) -> None:
    """Production argon2 parameters, interleaved tries, compare medians."""
    names = [f"user{n:02}" for n in range(ACCOUNTS)]
    for name in names:
        await register(name)

    async def timed(username: str) -> float:
        started = time.perf_counter()
        response = await client.post("/auth/login", json={"username": username, "password": "wrong password!"})
        elapsed = time.perf_counter() - started
        assert response.status == 401
        return elapsed

    known, unknown = [], []
    for n in range(TRIES):
        known.append(await timed(names[n % ACCOUNTS]))
        unknown.append(await timed(f"nobody-{uuid.uuid4().hex[:12]}"))

    known_ms, unknown_ms = statistics.median(known) * 1000, statistics.median(unknown) * 1000
    with capsys.disabled():
        print(f"\nlogin medians over {TRIES} tries: wrong password {known_ms:.1f} ms, unknown user {unknown_ms:.1f} ms")
    assert abs(known_ms - unknown_ms) / min(known_ms, unknown_ms) < 0.20
