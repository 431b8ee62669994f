"""Verification codes side by side: a resend leaves the codes mailed before it good, resends are bounded
per hour, and a verification beside an address change waits for it rather than deadlocking."""

from __future__ import annotations

import asyncio

import aiopg

from user_service.verification import RESEND_WINDOW, RESENDS_PER_HOUR

from .conftest import Auth, Client, Login, Register
from .test_user_email_verification import age_codes, codes, latest_code, me, outbox, verify

RESEND = "/users/me/email/verification"


async def test_a_code_mailed_before_a_resend_still_verifies(
    client: Client, register: Register, login: Login, auth: Auth, db: aiopg.Pool
) -> None:
    await register("ada")
    headers = auth((await login("ada"))["access_token"])
    mailed = [await latest_code(db)]
    # A user whose mail is late asks again, and again.
    for _ in range(2):
        await age_codes(db, 61)
        assert (await client.post(RESEND, headers=headers)).status == 202
        mailed.append(await latest_code(db))
    assert len(await codes(db)) == 3

    # The late mail arrives: the registration's code, the first mailed.
    assert await verify(client, mailed[0]) == (204, None)
    assert (await me(client, headers))["email_verified"] is True


async def test_using_any_code_ends_the_others(
    client: Client, register: Register, login: Login, auth: Auth, db: aiopg.Pool
) -> None:
    await register("ada")
    headers = auth((await login("ada"))["access_token"])
    for _ in range(2):
        await age_codes(db, 61)
        assert (await client.post(RESEND, headers=headers)).status == 202
    first, middle, last = [str(event.data["token"]) for event in await outbox(db)]

    assert (await verify(client, middle))[0] == 204

    assert await codes(db) == []
    for other in (first, last):
        status, problem = await verify(client, other)
        assert (status, problem and problem["code"]) == (400, "INVALID_VERIFICATION_TOKEN")


async def test_resends_are_bounded_per_hour_and_an_address_change_is_not_counted(
    client: Client, register: Register, login: Login, auth: Auth, db: aiopg.Pool
) -> None:
    await register("ada")
    headers = auth((await login("ada"))["access_token"])
    # The change's code, like the registration's, is mailed and not counted.
    assert (await client.patch("/users/me", json={"email": "ada@lovelace.org"}, headers=headers)).status == 200
    for _ in range(RESENDS_PER_HOUR):
        await age_codes(db, 61)
        assert (await client.post(RESEND, headers=headers)).status == 202
    await age_codes(db, 61)

    refused = await client.post(RESEND, headers=headers)

    assert refused.status == 429
    assert (await refused.json())["code"] == "VERIFICATION_RECENTLY_SENT"
    # The first resend is RESENDS_PER_HOUR times 61 s old: it leaves the hour then.
    first_leaves = RESEND_WINDOW - RESENDS_PER_HOUR * 61
    retry_after = int(refused.headers["Retry-After"])
    assert first_leaves - 5 <= retry_after <= first_leaves
    assert len(await outbox(db)) == 2 + RESENDS_PER_HOUR
    # Every code mailed is good still: the change's among them.
    assert len(await codes(db)) == 1 + RESENDS_PER_HOUR

    await age_codes(db, retry_after)
    assert (await client.post(RESEND, headers=headers)).status == 202
    # Now the minute's wait, and the hour's again: the second resend leaves
    # the hour 61 s from now.
    assert 59 <= int((await client.post(RESEND, headers=headers)).headers["Retry-After"]) <= 61


async def waiting_on_a_lock(db: aiopg.Pool) -> None:
    """Return once a session of this database waits on a lock; fail after 10 s."""
    async with db.acquire() as conn, conn.cursor() as cur:
        for _ in range(200):
            await cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            if (await cur.fetchone())[0]:
                return
            await asyncio.sleep(0.05)
    raise AssertionError("no session waited on a lock")


async def test_a_verification_beside_an_address_change_waits_for_it(
    client: Client, register: Register, db: aiopg.Pool
) -> None:
    await register("ada")
    token = await latest_code(db)
    # What a change of address does, held open: the account locked, then
    # its codes deleted. A verification that took the code before the
    # account deadlocked with it (40P01 after a second, a 503 or an error).
    async with db.acquire() as conn, conn.cursor() as change:
        await change.execute("BEGIN")
        await change.execute("SELECT id FROM users FOR UPDATE")
        verifying = asyncio.create_task(verify(client, token))
        await waiting_on_a_lock(db)
        await asyncio.wait_for(change.execute("DELETE FROM email_verifications"), 10)
        await change.execute("COMMIT")

    status, problem = await asyncio.wait_for(verifying, 10)
    assert (status, problem and problem["code"]) == (400, "INVALID_VERIFICATION_TOKEN")
