"""Pruning: refresh-token families and published events past their retention go, the rest stays."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import uuid
from collections.abc import Sequence
from typing import NamedTuple

import aiopg
import pytest
import redis.asyncio as aioredis
from pytest_aiohttp import AiohttpClient

from mesh_common.pruning import DAY, Pruned, PruneSettings, prune, prune_batch
from user_service.app import create_app
from user_service.refresh_tokens import RefreshTokenRejected, issue, prune_families, rotate
from user_service.settings import Settings, TokenPolicy

HOUR = 3600


class Family(NamedTuple):
    id: str
    tokens: list[str]


async def add_user(db: aiopg.Pool) -> str:
    name = uuid.uuid4().hex[:12]
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "INSERT INTO users (username, email, display_name, password_hash) VALUES (%s, %s, %s, 'x') RETURNING id",
            (name, f"{name}@example.com", name),
        )
        (user_id,) = await cur.fetchone()
    return str(user_id)


async def add_family(db: aiopg.Pool, user_id: str, expires_in: Sequence[int]) -> Family:
    """A chain of refreshes: each token the child of the one before, all but the last spent.

    ``expires_in``: when each expires, in seconds from now (negative: ago).
    """
    family = Family(str(uuid.uuid4()), [])
    parent_id = None
    async with db.acquire() as conn, conn.cursor() as cur:
        for seconds in expires_in:
            # Issued live, then moved: a policy refuses a lifetime of 0 or less.
            token = await issue(cur, user_id, TokenPolicy(), 0, family_id=family.id, parent_id=parent_id)
            await cur.execute(
                "UPDATE refresh_tokens SET expires_at = now() + make_interval(secs => %s)"
                " WHERE token_hash = %s RETURNING id",
                (seconds, hashlib.sha256(token.encode()).digest()),
            )
            (parent_id,) = await cur.fetchone()
            family.tokens.append(token)
        await cur.execute(
            "UPDATE refresh_tokens SET spent_at = now() WHERE family_id = %s AND id <> %s", (family.id, parent_id)
        )
    return family


async def families(db: aiopg.Pool) -> dict[str, int]:
    """Each family left, with how many tokens it has."""
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT family_id::text, count(*) FROM refresh_tokens GROUP BY family_id")
        return dict(await cur.fetchall())


async def test_a_family_goes_once_its_last_token_expired_longer_ago_than_the_retention(db: aiopg.Pool) -> None:
    user = await add_user(db)
    ended = await add_family(db, user, [-3 * DAY, -2 * DAY])
    just_ended = await add_family(db, user, [-3 * DAY, -HOUR])
    live = await add_family(db, user, [DAY])

    pruned = await prune(db, prune_families(DAY), batch_size=100)

    assert pruned == Pruned(rows=2, batches=1, skipped=False)
    assert await families(db) == {just_ended.id: 2, live.id: 1}
    assert ended.id not in await families(db)


async def test_a_live_family_keeps_its_expired_spent_tokens_so_their_reuse_still_revokes_it(db: aiopg.Pool) -> None:
    user = await add_user(db)
    stolen, current = (await add_family(db, user, [-30 * DAY, DAY])).tokens

    assert (await prune(db, prune_families(DAY), batch_size=100)).rows == 0
    with pytest.raises(RefreshTokenRejected, match="reused"):
        await rotate(db, stolen, TokenPolicy(refresh_ttl=DAY))
    with pytest.raises(RefreshTokenRejected, match="revoked"):
        await rotate(db, current, TokenPolicy(refresh_ttl=DAY))


async def test_a_batch_deletes_no_more_than_its_limit_even_along_a_family_chain(db: aiopg.Pool) -> None:
    user = await add_user(db)
    # Deleting a token deletes its children (ON DELETE CASCADE): a batch
    # taking the oldest first would take the whole chain with it.
    chain = await add_family(db, user, [-9 * DAY, -8 * DAY, -7 * DAY, -6 * DAY, -5 * DAY])
    job = prune_families(DAY)

    assert await prune_batch(db, job, 2) == 2
    assert await families(db) == {chain.id: 3}
    assert await prune(db, job, batch_size=2) == Pruned(rows=3, batches=2, skipped=False)
    assert await families(db) == {}


async def test_a_batch_deletes_no_more_than_its_limit_when_a_chain_ends_with_its_session(db: aiopg.Pool) -> None:
    user = await add_user(db)
    chain = await add_family(db, user, [-9 * DAY, -8 * DAY, -7 * DAY, -6 * DAY, -5 * DAY])
    # Refreshed within its session's last TTL, every token of a family
    # expires when the session ends: one expires_at for all. Rewritten one
    # by one, the root last, so that the table's physical order is not the
    # chain's and cannot break the tie by luck.
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT now() - interval '5 days'")
        (ended,) = await cur.fetchone()
        await cur.execute("SELECT id FROM refresh_tokens WHERE family_id = %s ORDER BY created_at DESC", (chain.id,))
        for (token_id,) in await cur.fetchall():
            await cur.execute(
                "UPDATE refresh_tokens SET expires_at = %s, session_expires_at = %s WHERE id = %s",
                (ended, ended, token_id),
            )
    job = prune_families(DAY)

    assert await prune_batch(db, job, 2) == 2
    assert await families(db) == {chain.id: 3}
    assert await prune(db, job, batch_size=2) == Pruned(rows=3, batches=2, skipped=False)


async def test_the_service_prunes_tokens_and_events_every_interval(
    aiohttp_client: AiohttpClient, settings: Settings, db: aiopg.Pool, redis: aioredis.Redis
) -> None:
    user = await add_user(db)
    ended = await add_family(db, user, [-9 * DAY])
    live = await add_family(db, user, [DAY])
    async with db.acquire() as conn, conn.cursor() as cur:
        # Routing keys no queue is bound to: a relay publishing them delivers nothing.
        await cur.execute(
            "INSERT INTO outbox (id, routing_key, payload, correlation_id, created_at, published_at) VALUES"
            " (gen_random_uuid(), 'test.pruned', '{}', 'test', now() - interval '9 days', now() - interval '8 days'),"
            " (gen_random_uuid(), 'test.kept', '{}', 'test', now() - interval '9 days', now() - interval '6 days')"
        )
    settings = dataclasses.replace(settings, prune=PruneSettings(interval=0.05))
    await aiohttp_client(create_app(settings, register=False))

    async def outbox() -> set[str]:
        async with db.acquire() as conn, conn.cursor() as cur:
            await cur.execute("SELECT routing_key FROM outbox")
            return {row[0] for row in await cur.fetchall()}

    async with asyncio.timeout(10):
        while await families(db) != {live.id: 1} or await outbox() != {"test.kept"}:
            await asyncio.sleep(0.02)
    assert ended.id not in await families(db)
