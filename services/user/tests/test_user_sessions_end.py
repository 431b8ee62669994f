"""A new password, and "sign out everywhere": every session of the account ends, at once and for good."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import aiopg
import pytest
from aiohttp import ClientResponse
from argon2 import PasswordHasher
from pytest_aiohttp import AiohttpClient

from mesh_common.events import Event
from user_service.app import create_app
from user_service.keys import PASSWORD_SLOTS, PASSWORDS
from user_service.passwords import Verdict
from user_service.settings import Settings, ThrottlePolicy

from .conftest import PASSWORD, SERVICE_SECRET, Auth, Client, Login, Register

NEW_PASSWORD = "another long passphrase, never used"


async def refresh(client: Client, token: str) -> ClientResponse:
    return await client.post("/auth/refresh", json={"refresh_token": token})


async def change(client: Client, access: str, current: str, new: str) -> ClientResponse:
    return await client.post(
        "/users/me/password",
        json={"current_password": current, "new_password": new},
        headers={"Authorization": f"Bearer {access}"},
    )


async def password_notices(db: aiopg.Pool) -> list[dict[str, Any]]:
    """The data of every user.password_changed in the outbox: published or not, it is kept."""
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT payload FROM outbox WHERE routing_key = 'user.password_changed'")
        return [Event.from_json(bytes(payload)).data for (payload,) in await cur.fetchall()]


def held_verify(client: Client) -> tuple[asyncio.Event, asyncio.Event]:
    """Holds the next password check until the test lets it go: (it has begun, let it go).

    The check runs between reading the account's credentials and writing
    what they prove, which is where another change can come in.
    """
    passwords = client.app[PASSWORDS]
    verify = passwords.verify
    begun, go_on = asyncio.Event(), asyncio.Event()

    async def held(stored_hash: str | None, password: str) -> Verdict:
        if not begun.is_set():
            begun.set()
            await go_on.wait()
        return await verify(stored_hash, password)

    passwords.verify = held  # type: ignore[method-assign]
    return begun, go_on


async def while_held(client: Client, first: Awaitable[ClientResponse], meanwhile: Callable[[], Awaitable[Any]]) -> Any:
    """``first``'s answer, once ``meanwhile`` ran to its end while ``first``'s password check was held."""
    begun, go_on = held_verify(client)
    pending = asyncio.ensure_future(first)
    async with asyncio.timeout(10):
        await begun.wait()
    await meanwhile()
    go_on.set()
    async with asyncio.timeout(10):
        return await pending


async def test_a_new_password_ends_every_session_and_starts_one(
    client: Client, register: Register, login: Login, db: aiopg.Pool
) -> None:
    ada = await register()
    phone, laptop = await login(), await login()
    spent = phone["refresh_token"]
    phone = await (await refresh(client, spent)).json()

    response = await change(client, laptop["access_token"], PASSWORD, NEW_PASSWORD)

    assert response.status == 200, await response.text()
    assert response.headers["Cache-Control"] == "no-store"
    # Its owner is told, with the change (test_user_events.py follows it to the broker).
    [notice] = await password_notices(db)
    assert (notice["user_id"], notice["username"], notice["email"]) == (ada["id"], "ada", "ada@example.com")
    fresh = await response.json()
    for ended in (phone["refresh_token"], laptop["refresh_token"]):
        answer = await refresh(client, ended)
        assert (answer.status, (await answer.json())["code"]) == (401, "INVALID_REFRESH_TOKEN")
    assert (await refresh(client, fresh["refresh_token"])).status == 200
    old = await client.post("/auth/login", json={"username": "ada", "password": PASSWORD})
    assert old.status == 401
    await login(password=NEW_PASSWORD)
    # A spent token of an ended session is refused, and revokes nothing: the
    # new session was not its family.
    assert (await refresh(client, spent)).status == 401
    await login(password=NEW_PASSWORD)


async def test_a_wrong_current_password_changes_nothing_and_counts_as_a_failed_login(
    aiohttp_client: AiohttpClient, settings: Settings, register: Register, db: aiopg.Pool
) -> None:
    client = await aiohttp_client(
        create_app(dataclasses.replace(settings, throttle=ThrottlePolicy(max_failures=3)), register=False)
    )
    await register()
    tokens = await (await client.post("/auth/login", json={"username": "ada", "password": PASSWORD})).json()

    for _ in range(3):
        refused = await change(client, tokens["access_token"], "not my password", NEW_PASSWORD)
        assert (refused.status, (await refused.json())["code"]) == (403, "INVALID_CURRENT_PASSWORD")
    # The account's guesses are used up: by a change as by a login.
    locked = await change(client, tokens["access_token"], PASSWORD, NEW_PASSWORD)
    assert (locked.status, (await locked.json())["code"]) == (429, "RATE_LIMITED")
    assert int(locked.headers["Retry-After"]) >= 1
    login = await client.post("/auth/login", json={"username": "ada", "password": PASSWORD})
    assert login.status == 429
    assert (await refresh(client, tokens["refresh_token"])).status == 200
    assert await password_notices(db) == []


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"current_password": PASSWORD, "new_password": "password1"}, ["new_password"]),
        ({"current_password": PASSWORD, "new_password": "ada"}, ["new_password"]),
        ({"current_password": PASSWORD, "new_password": "ada@example.com"}, ["new_password"]),
        ({"current_password": PASSWORD, "new_password": PASSWORD}, ["new_password"]),
        # The same once normalized: full-width letters are the letters.
        ({"current_password": PASSWORD, "new_password": PASSWORD.replace("a", "\uff41")}, ["new_password"]),
        ({"current_password": "", "new_password": NEW_PASSWORD}, ["current_password"]),
        ({"new_password": NEW_PASSWORD}, ["current_password"]),
        ({"current_password": PASSWORD, "new_password": NEW_PASSWORD, "logout": True}, ["logout"]),
    ],
)
async def test_a_refused_new_password_is_a_422_and_changes_nothing(
    client: Client, register: Register, login: Login, db: aiopg.Pool, body: dict[str, Any], fields: list[str]
) -> None:
    await register()
    tokens = await login()
    response = await client.post(
        "/users/me/password", json=body, headers={"Authorization": f"Bearer {tokens['access_token']}"}
    )
    assert response.status == 422
    problem = await response.json()
    assert (problem["code"], [error["field"] for error in problem["errors"]]) == ("VALIDATION_FAILED", fields)
    assert (await refresh(client, tokens["refresh_token"])).status == 200
    await login()
    assert await password_notices(db) == []


async def test_signing_out_everywhere_ends_every_session_this_one_too(
    client: Client, register: Register, login: Login, auth: Auth
) -> None:
    await register()
    await register("grace")
    phone, laptop, other = await login(), await login(), await login("grace")

    response = await client.delete("/users/me/sessions", headers=auth(phone["access_token"]))

    assert response.status == 204
    for ended in (phone["refresh_token"], laptop["refresh_token"]):
        assert (await refresh(client, ended)).status == 401
    assert (await refresh(client, other["refresh_token"])).status == 200
    # The password is unchanged, and a new session works as any does.
    again = await login()
    renewed = await refresh(client, again["refresh_token"])
    assert renewed.status == 200
    assert (await refresh(client, (await renewed.json())["refresh_token"])).status == 200


async def test_a_login_checked_before_the_sessions_ended_starts_none_that_outlives_them(
    client: Client, register: Register, login: Login, auth: Auth
) -> None:
    # The login reads the account's epoch with its password hash: read again
    # when the family is written, it would be the new one, and a login made
    # with a password from before a change would keep a session after it.
    await register()
    first = await login()

    late = await while_held(
        client,
        client.post("/auth/login", json={"username": "ada", "password": PASSWORD}),
        lambda: client.delete("/users/me/sessions", headers=auth(first["access_token"])),
    )

    assert late.status == 200
    assert (await refresh(client, (await late.json())["refresh_token"])).status == 401


async def test_two_changes_at_once_one_wins_and_the_other_is_told(
    client: Client, register: Register, login: Login, db: aiopg.Pool
) -> None:
    await register()
    tokens = await login()
    third = "a third passphrase, also long"

    async def meanwhile() -> None:
        assert (await change(client, tokens["access_token"], PASSWORD, NEW_PASSWORD)).status == 200

    late = await while_held(client, change(client, tokens["access_token"], PASSWORD, third), meanwhile)

    assert (late.status, (await late.json())["code"]) == (409, "CONFLICT")
    await login(password=NEW_PASSWORD)
    assert (await client.post("/auth/login", json={"username": "ada", "password": third})).status == 401
    assert len(await password_notices(db)) == 1  # the loser's is rolled back with its change


async def test_a_login_upgrading_the_hash_meanwhile_is_no_conflict(
    client: Client, register: Register, login: Login, db: aiopg.Pool
) -> None:
    # A login rehashes a password stored with weaker parameters: the hash
    # changes, the password does not, and the change still goes through.
    await register()
    tokens = await login()
    weak = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(PASSWORD)
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("UPDATE users SET password_hash = %s WHERE username = 'ada'", (weak,))

    late = await while_held(client, change(client, tokens["access_token"], PASSWORD, NEW_PASSWORD), login)

    assert late.status == 200, await late.text()
    await login(password=NEW_PASSWORD)
    assert len(await password_notices(db)) == 1  # one change, told once, though written on a second try


async def test_a_change_refused_as_too_busy_is_no_failed_login(
    aiohttp_client: AiohttpClient, settings: Settings, register: Register
) -> None:
    busy = dataclasses.replace(settings.passwords, queue_seconds=0.05)
    app = create_app(dataclasses.replace(settings, throttle=ThrottlePolicy(max_failures=2), passwords=busy))
    client = await aiohttp_client(app)
    await register()
    tokens = await (await client.post("/auth/login", json={"username": "ada", "password": PASSWORD})).json()
    slots, held = client.app[PASSWORD_SLOTS], 0
    while not slots.locked():  # every hashing slot taken, as by a storm of logins
        await slots.acquire()
        held += 1
    try:
        for _ in range(2):
            refused = await change(client, tokens["access_token"], PASSWORD, NEW_PASSWORD)
            assert (refused.status, (await refused.json())["code"]) == (503, "TOO_BUSY")
    finally:
        for _ in range(held):
            slots.release()

    assert (await change(client, tokens["access_token"], PASSWORD, NEW_PASSWORD)).status == 200


async def test_a_service_token_can_neither_change_a_password_nor_end_sessions(client: Client, auth: Auth) -> None:
    issued = await client.post(
        "/auth/service-token", json={"client_id": "notification-service", "client_secret": SERVICE_SECRET}
    )
    token = (await issued.json())["access_token"]
    changed = await change(client, token, PASSWORD, NEW_PASSWORD)
    ended = await client.delete("/users/me/sessions", headers=auth(token))
    assert [(r.status, (await r.json())["code"]) for r in (changed, ended)] == [(403, "FORBIDDEN")] * 2
