"""Refresh tokens: spent at each use, revoked as a family on reuse or logout, refused once expired, stored hashed."""

from __future__ import annotations

import asyncio

import aiopg

from user_service.keys import WRITE_SLOTS
from user_service.settings import Settings

from .conftest import Client, Login, Register


async def test_refresh_rotates_the_pair_and_spends_the_old_token(
    client: Client, register: Register, login: Login
) -> None:
    await register()
    first = await login()
    response = await client.post("/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert response.status == 200
    second = await response.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    assert response.headers["Cache-Control"] == "no-store"


async def test_reusing_a_spent_refresh_token_revokes_the_whole_family(
    client: Client, register: Register, login: Login
) -> None:
    await register()
    first = (await login())["refresh_token"]
    second = (await (await client.post("/auth/refresh", json={"refresh_token": first})).json())["refresh_token"]
    third = (await (await client.post("/auth/refresh", json={"refresh_token": second})).json())["refresh_token"]

    reuse = await client.post("/auth/refresh", json={"refresh_token": first})
    assert reuse.status == 401
    assert (await reuse.json())["code"] == "INVALID_REFRESH_TOKEN"
    # The newest descendant, never used, is revoked with the rest.
    response = await client.post("/auth/refresh", json={"refresh_token": third})
    assert response.status == 401


async def test_other_sessions_survive_a_revoked_family(client: Client, register: Register, login: Login) -> None:
    await register()
    phone, laptop = (await login())["refresh_token"], (await login())["refresh_token"]
    await client.post("/auth/refresh", json={"refresh_token": phone})
    await client.post("/auth/refresh", json={"refresh_token": phone})
    assert (await client.post("/auth/refresh", json={"refresh_token": laptop})).status == 200


async def test_made_up_refresh_tokens_never_wait_for_a_write_slot(
    client: Client, register: Register, login: Login
) -> None:
    # Refresh and logout are public: a flood of made-up tokens, from many
    # addresses, held the slots that logins and registrations wait for.
    await register()
    issued = (await login())["refresh_token"]
    slots = client.app[WRITE_SLOTS]
    held = 0
    while not slots.locked():  # every slot taken, as by other writes in progress
        await slots.acquire()
        held += 1
    try:
        async with asyncio.timeout(5):
            refreshed = await client.post("/auth/refresh", json={"refresh_token": "never-issued"})
            logged_out = await client.post("/auth/logout", json={"refresh_token": "never-issued"})
        assert (refreshed.status, (await refreshed.json())["code"]) == (401, "INVALID_REFRESH_TOKEN")
        assert logged_out.status == 204
        # An issued token still waits its turn for a slot.
        waiting = asyncio.ensure_future(client.post("/auth/refresh", json={"refresh_token": issued}))
        await asyncio.sleep(0.2)  # not a wait for readiness: a span in which it must NOT finish
        assert not waiting.done()
    finally:
        for _ in range(held):
            slots.release()
    assert (await waiting).status == 200


async def test_logout_revokes_the_family(client: Client, register: Register, login: Login) -> None:
    await register()
    first = (await login())["refresh_token"]
    second = (await (await client.post("/auth/refresh", json={"refresh_token": first})).json())["refresh_token"]
    response = await client.post("/auth/logout", json={"refresh_token": first})
    assert response.status == 204
    assert (await client.post("/auth/refresh", json={"refresh_token": second})).status == 401
    assert (await client.post("/auth/logout", json={"refresh_token": "never-issued"})).status == 204


async def lock_waiters(db: aiopg.Pool) -> int:
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        row = await cur.fetchone()
    return int(row[0])


async def until_waiting(db: aiopg.Pool, count: int) -> None:
    async with asyncio.timeout(10):  # bounded: polled every 20 ms
        while await lock_waiters(db) < count:
            await asyncio.sleep(0.02)


async def test_a_logout_racing_a_refresh_leaves_no_token_of_the_family_alive(
    client: Client, register: Register, login: Login, db: aiopg.Pool, settings: Settings
) -> None:
    # The refresh reaches the token first and has to wait for it (a third
    # connection holds its row); the logout comes while it waits. Whichever
    # way they run, once both have answered nothing of the family may refresh.
    await register()
    token = (await login())["refresh_token"]
    async with aiopg.connect(settings.database_url) as holder, holder.cursor() as cur:
        await cur.execute("BEGIN")
        await cur.execute("SELECT 1 FROM refresh_tokens FOR UPDATE")
        refresh = asyncio.create_task(client.post("/auth/refresh", json={"refresh_token": token}))
        logout = None
        try:
            await until_waiting(db, 1)
            logout = asyncio.create_task(client.post("/auth/logout", json={"refresh_token": token}))
            await until_waiting(db, 2)
        except BaseException:
            for task in (refresh, logout):
                if task is not None:
                    task.cancel()
            raise
        finally:
            await cur.execute("ROLLBACK")
    refreshed, logged_out = await asyncio.gather(refresh, logout)
    assert logged_out.status == 204
    # Either order is right; anything else (a 500 from the loser) is not.
    assert refreshed.status in (200, 401), await refreshed.text()
    if refreshed.status == 200:
        child = (await refreshed.json())["refresh_token"]
        assert (await client.post("/auth/refresh", json={"refresh_token": child})).status == 401
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT count(*) FROM refresh_tokens WHERE revoked_at IS NULL")
        assert await cur.fetchone() == (0,)


async def test_an_expired_refresh_token_is_refused(
    client: Client, register: Register, login: Login, db: aiopg.Pool
) -> None:
    await register()
    token = (await login())["refresh_token"]
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("UPDATE refresh_tokens SET expires_at = now() - interval '1 second'")
    assert (await client.post("/auth/refresh", json={"refresh_token": token})).status == 401


async def test_refresh_tokens_are_stored_hashed(register: Register, login: Login, db: aiopg.Pool) -> None:
    await register()
    token = (await login())["refresh_token"]
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT token_hash FROM refresh_tokens")
        (stored,) = await cur.fetchone()
    assert token.encode() not in bytes(stored)
    assert len(bytes(stored)) == 32
