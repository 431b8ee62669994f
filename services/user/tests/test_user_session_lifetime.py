"""A refresh-token family ends REFRESH_SESSION_MAX_SECONDS after its login, however often it is refreshed.

Time passes by moving every stored timestamp back (``elapse``), never by waiting.
"""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import datetime, timedelta
from typing import NamedTuple

import aiopg
import pytest

from mesh_common.pruning import prune
from user_service.refresh_tokens import RefreshTokenRejected, prune_families, rotate
from user_service.settings import Settings

from .conftest import Client, Login, Register

MINUTE = 60
TTL = 60 * MINUTE
MAX = 180 * MINUTE


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return dataclasses.replace(
        settings, tokens=dataclasses.replace(settings.tokens, refresh_ttl=TTL, refresh_session_max=MAX)
    )


class Stored(NamedTuple):
    created_at: datetime
    expires_at: datetime
    session_expires_at: datetime | None
    revoked: bool


async def stored(db: aiopg.Pool) -> list[Stored]:
    """Every refresh token, oldest first."""
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "SELECT created_at, expires_at, session_expires_at, revoked_at IS NOT NULL"
            " FROM refresh_tokens ORDER BY created_at"
        )
        return [Stored(*row) for row in await cur.fetchall()]


async def elapse(db: aiopg.Pool, seconds: int) -> None:
    """As if ``seconds`` had passed: every timestamp moves that far into the past."""
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "UPDATE refresh_tokens SET created_at = created_at - s, expires_at = expires_at - s,"
            " session_expires_at = session_expires_at - s, spent_at = spent_at - s, revoked_at = revoked_at - s"
            " FROM make_interval(secs => %s) AS s",
            (seconds,),
        )


async def update_family(db: aiopg.Pool, token: str, assignments: str) -> None:
    """``UPDATE refresh_tokens SET <assignments>`` on every token of ``token``'s family."""
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            f"UPDATE refresh_tokens SET {assignments} WHERE family_id ="
            " (SELECT family_id FROM refresh_tokens WHERE token_hash = %s)",
            (hashlib.sha256(token.encode()).digest(),),
        )


async def refresh(client: Client, token: str) -> str:
    response = await client.post("/auth/refresh", json={"refresh_token": token})
    assert response.status == 200, await response.text()
    return str((await response.json())["refresh_token"])


@pytest.fixture
async def refreshed_all_along(client: Client, register: Register, login: Login, db: aiopg.Pool) -> str:
    """A session logged in 160 minutes ago and refreshed every 40: its newest token, of five."""
    await register()
    token = (await login())["refresh_token"]
    for _ in range(4):
        await elapse(db, 40 * MINUTE)
        token = await refresh(client, token)
    return token


async def test_a_login_starts_a_session_that_ends_refresh_session_max_later(
    register: Register, login: Login, db: aiopg.Pool
) -> None:
    await register()
    await login()
    (root,) = await stored(db)
    assert root.session_expires_at is not None
    assert root.session_expires_at - root.created_at == timedelta(seconds=MAX)
    assert root.expires_at - root.created_at == timedelta(seconds=TTL)


async def test_a_child_never_outlives_its_session(
    client: Client, register: Register, login: Login, db: aiopg.Pool
) -> None:
    await register()
    token = (await login())["refresh_token"]
    # Ten minutes before the session's end (and so the token's).
    await update_family(
        db, token, "session_expires_at = now() + interval '10 minutes', expires_at = now() + interval '10 minutes'"
    )

    await refresh(client, token)

    root, child = await stored(db)
    assert child.session_expires_at == root.session_expires_at == child.expires_at
    assert child.expires_at - child.created_at < timedelta(minutes=11)


async def test_every_child_inherits_its_familys_session_end(
    settings: Settings, refreshed_all_along: str, db: aiopg.Pool
) -> None:
    tokens = await stored(db)
    (session_end,) = {row.session_expires_at for row in tokens}
    assert session_end is not None
    assert session_end - tokens[0].created_at == timedelta(seconds=MAX)
    # Issued at 0, 40 and 80 minutes: a whole TTL each. At 120 and 160:
    # both end with the session, at 180 (the second 40 minutes short of a TTL).
    assert [row.expires_at - row.created_at for row in tokens[:3]] == [timedelta(seconds=TTL)] * 3
    assert [row.expires_at for row in tokens[3:]] == [session_end, session_end]

    await elapse(db, 40 * MINUTE)
    with pytest.raises(RefreshTokenRejected, match="session_expired"):
        await rotate(db, refreshed_all_along, settings.tokens)


async def test_a_refresh_after_its_session_ended_gets_the_expired_token_answer_and_revokes_nothing(
    client: Client, settings: Settings, register: Register, login: Login, db: aiopg.Pool
) -> None:
    await register()
    ended = (await login())["refresh_token"]
    expired = (await login())["refresh_token"]
    await update_family(
        db, ended, "session_expires_at = now() - interval '1 second', expires_at = now() - interval '1 second'"
    )
    await update_family(db, expired, "expires_at = now() - interval '1 second'")

    answers = set()
    for token in (ended, expired, ended):
        response = await client.post("/auth/refresh", json={"refresh_token": token})
        answers.add((response.status, await response.read()))
    (answer,) = answers
    assert answer[0] == 401
    assert b'"INVALID_REFRESH_TOKEN"' in answer[1]

    # Told apart in the log only; presented twice, still not taken for a reuse.
    reasons = []
    for token in (ended, expired):
        with pytest.raises(RefreshTokenRejected) as rejected:
            await rotate(db, token, settings.tokens)
        reasons.append(rejected.value.reason)
    assert reasons == ["session_expired", "expired"]
    assert not any(row.revoked for row in await stored(db))


async def test_a_family_from_before_session_ends_gets_one_at_its_next_rotation(
    client: Client, register: Register, login: Login, db: aiopg.Pool
) -> None:
    await register()
    token = (await login())["refresh_token"]
    await update_family(db, token, "session_expires_at = NULL")  # as migration 0006 leaves older rows
    await elapse(db, 50 * MINUTE)

    await refresh(client, token)

    old, child = await stored(db)
    assert old.session_expires_at is None
    assert child.session_expires_at is not None
    assert child.session_expires_at - child.created_at == timedelta(seconds=MAX)
    assert child.expires_at - child.created_at == timedelta(seconds=TTL)


async def test_a_family_refreshed_until_its_session_ended_is_pruned_after_the_retention(
    settings: Settings, refreshed_all_along: str, db: aiopg.Pool
) -> None:
    job = prune_families(settings.tokens.refresh_retention)

    # The session ends 20 minutes after the last refresh; the family goes
    # the retention after that, and not before.
    await elapse(db, 20 * MINUTE + settings.tokens.refresh_retention - MINUTE)
    assert (await prune(db, job, batch_size=100)).rows == 0
    await elapse(db, 2 * MINUTE)
    assert (await prune(db, job, batch_size=100)).rows == 5
    assert await stored(db) == []
