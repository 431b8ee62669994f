"""Failed logins are throttled per account, across instances, through Redis."""

from __future__ import annotations

import asyncio
import dataclasses

import aiopg
import pytest
import redis.asyncio as aioredis
from aiohttp import ClientResponse
from pytest_aiohttp import AiohttpClient

from mesh_common.settings import SettingsError
from user_service.app import create_app
from user_service.keys import PASSWORD_SLOTS
from user_service.settings import Settings, ThrottlePolicy

from .conftest import Client, Register

PASSWORD = "a long and unusual passphrase"


async def attempt(client: Client, username: str, password: str) -> ClientResponse:
    return await client.post("/auth/login", json={"username": username, "password": password})


async def test_ten_failures_lock_the_account_on_every_instance_and_no_other(
    aiohttp_client: AiohttpClient, settings: Settings, client: Client, register: Register
) -> None:
    other_instance = await aiohttp_client(create_app(settings, register=False))
    await register("ada")
    await register("grace")

    # Spread over both instances: the count lives in Redis, not in a process.
    failures = [attempt((client, other_instance)[n % 2], "ada", "wrong password!") for n in range(10)]
    assert [r.status for r in await asyncio.gather(*failures)] == [401] * 10

    for instance in (client, other_instance):
        locked = await attempt(instance, "ada", PASSWORD)
        assert locked.status == 429
        assert (await locked.json())["code"] == "RATE_LIMITED"
        assert 1 <= int(locked.headers["Retry-After"]) <= 60
    # Whatever the case the name is typed in.
    assert (await attempt(other_instance, "ADA", PASSWORD)).status == 429
    assert (await attempt(client, "grace", PASSWORD)).status == 200


async def test_concurrent_guesses_never_check_more_than_ten_passwords(client: Client, register: Register) -> None:
    await register("ada")
    statuses = [r.status for r in await asyncio.gather(*(attempt(client, "ada", f"guess {n:04}") for n in range(30)))]
    assert statuses.count(401) == 10
    assert statuses.count(429) == 20


async def test_successful_logins_do_not_count(client: Client, register: Register) -> None:
    await register("ada")
    for _ in range(9):
        assert (await attempt(client, "ada", "wrong password!")).status == 401
    for _ in range(3):
        assert (await attempt(client, "ada", PASSWORD)).status == 200
    assert (await attempt(client, "ada", "wrong password!")).status == 401
    assert (await attempt(client, "ada", PASSWORD)).status == 429


async def test_unknown_names_are_throttled_like_real_ones(client: Client) -> None:
    statuses = [(await attempt(client, "nobody", "wrong password!")).status for _ in range(11)]
    assert statuses == [401] * 10 + [429]


async def test_every_name_of_an_account_counts_against_the_account(client: Client, register: Register) -> None:
    # Ten guesses in all, whichever name each one used: not ten per spelling.
    await register("ada", email="ada@example.com")
    names = ["ada", "ada@example.com", "ADA", " Ada@Example.com "]
    statuses = [(await attempt(client, names[n % 4], "wrong password!")).status for n in range(10)]
    assert statuses == [401] * 10
    for name in names:
        assert (await attempt(client, name, PASSWORD)).status == 429, name


async def test_a_spelling_postgres_folds_onto_a_name_shares_its_count_known_or_not(
    client: Client, register: Register
) -> None:
    # PostgreSQL lowers "İ" to "i", Python to "i̇". Counted under Python's
    # fold, an unknown name's "İ" spelling had a count of its own, where a
    # known name's shared its account's: a 401 against a 429 told them apart.
    await register("kiri")
    for name in ("kiri", "miri"):  # an account, and nobody
        statuses = [(await attempt(client, name, "wrong password!")).status for _ in range(10)]
        assert statuses == [401] * 10
        assert (await attempt(client, name.replace("i", "İ", 1), "wrong password!")).status == 429, name


async def test_a_login_that_waits_too_long_for_the_hasher_is_a_503(
    aiohttp_client: AiohttpClient, settings: Settings, db: aiopg.Pool, redis: aioredis.Redis
) -> None:
    passwords = dataclasses.replace(settings.passwords, queue_seconds=0.2)
    client = await aiohttp_client(create_app(dataclasses.replace(settings, passwords=passwords), register=False))
    slots = client.app[PASSWORD_SLOTS]
    held = 0
    while not slots.locked():  # every hashing slot busy, as in a storm
        await slots.acquire()
        held += 1
    try:
        # Without a bound it waited as long as the storm lasted, and then did
        # the work for a caller the gateway had long given up on.
        async with asyncio.timeout(5):
            response = await attempt(client, "ada", PASSWORD)
        assert response.status == 503
        assert response.headers["Retry-After"] == "1"
        assert (await response.json())["code"] == "TOO_BUSY"
    finally:
        for _ in range(held):
            slots.release()
    assert (await attempt(client, "ada", PASSWORD)).status == 401  # served again once a slot is free


async def test_the_window_slides_so_no_window_holds_more_than_ten_checked_passwords(
    aiohttp_client: AiohttpClient, settings: Settings, register: Register
) -> None:
    # A fixed window, counted from the first failure and reset at its end,
    # checked nineteen passwords in two seconds here: one at its start, nine
    # just before its end and ten just after.
    # The nine must all be in when the first has left: they have the window
    # less the second's pause, 5 s, about half a second each on a slow minute
    # (a login is ~30 ms here).
    window = 6
    throttle = dataclasses.replace(settings.throttle, window_seconds=window)
    client = await aiohttp_client(create_app(dataclasses.replace(settings, throttle=throttle), register=False))
    await register("ada")
    loop = asyncio.get_running_loop()
    assert (await attempt(client, "ada", "wrong password!")).status == 401
    first_done = loop.time()
    await asyncio.sleep(1)  # time passing is the subject here, not a wait for readiness
    nine_began = loop.time()
    for _ in range(9):
        assert (await attempt(client, "ada", "wrong password!")).status == 401
    await asyncio.sleep(max(0.0, first_done + window + 0.05 - loop.time()))
    # Only the first failure has left the window: one more guess, not ten.
    assert loop.time() < nine_began + window, "the nine took longer than the window: none of this holds"
    assert (await attempt(client, "ada", "wrong password!")).status == 401
    locked = await attempt(client, "ada", PASSWORD)
    assert locked.status == 429
    assert 1 <= int(locked.headers["Retry-After"]) <= window


def test_a_throttle_without_a_window_or_a_limit_is_refused() -> None:
    # Redis drops a key given a TTL of 0: every guess would find an empty count.
    for variable in ("LOGIN_WINDOW_SECONDS", "LOGIN_MAX_FAILURES"):
        for value in ("0", "-5"):
            with pytest.raises(SettingsError, match=variable):
                ThrottlePolicy(**{variable.removeprefix("LOGIN_").lower(): int(value)})
