"""After the signing-key table leaked: ``rotate-keys --compromised`` leaves no key of the copy signing or verifying."""

from __future__ import annotations

import asyncio
import time
import uuid

import aiopg
import jwt
import redis.asyncio as aioredis
from pytest_aiohttp import AiohttpClient

from mesh_common.auth import VERIFIER
from mesh_common.testing import run_module
from user_service.__main__ import manage_keys
from user_service.app import create_app
from user_service.settings import Settings, TokenPolicy
from user_service.signing_keys import ensure_keys, replace_compromised_keys, rotate_keys

from .conftest import SERVICE_SECRET, Auth, Client, Login, Register


def forged(pem: str, kid: str, subject: str, policy: TokenPolicy, **claims: str) -> str:
    """An access token as the attacker makes it, with a PEM from the leaked table."""
    now = int(time.time())
    body = {"iss": policy.issuer, "aud": policy.audience, "sub": subject, "iat": now, "nbf": now}
    body |= {"exp": now + 3600, "jti": uuid.uuid4().hex, **claims}
    return jwt.encode(body, pem, algorithm="EdDSA", headers={"kid": kid, "typ": "at+jwt"})


async def leaked(db: aiopg.Pool) -> dict[str, tuple[str, str]]:
    """The table as an attacker copied it: state -> (kid, PEM)."""
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT state, kid, private_key_pem FROM signing_keys WHERE state <> 'retired'")
        return {state: (kid, pem) for state, kid, pem in await cur.fetchall()}


async def key_states(db: aiopg.Pool) -> dict[str, str]:
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT kid, state FROM signing_keys")
        return dict(await cur.fetchall())


async def test_after_the_documented_recovery_no_leaked_key_signs_or_verifies(
    client: Client, register: Register, login: Login, auth: Auth, settings: Settings, db: aiopg.Pool
) -> None:
    user = await register()
    old_token = (await login())["access_token"]
    await rotate_keys(db, min_published=0)  # so that a retiring key leaks too
    copy = await leaked(db)
    assert set(copy) == {"active", "next", "retiring"}
    next_kid, next_pem = copy["next"]
    policy = settings.tokens
    active_kid, active_pem = copy["active"]
    control = forged(active_pem, active_kid, user["id"], policy)
    assert (await client.get("/users/me", headers=auth(control))).status == 200, "control: a forgery that verifies"

    await manage_keys(settings.database_url, "rotate-keys", None, tokens=policy, force=False, compromised=True)
    await client.app[VERIFIER].refresh(force=True)  # what every instance does each SIGNING_KEY_REFRESH_SECONDS

    # The next key was published and about to sign: promoted, the copy of it
    # would sign for real, for any user and any service.
    as_user = forged(next_pem, next_kid, user["id"], policy)
    assert (await client.get("/users/me", headers=auth(as_user))).status == 401
    as_service = forged(next_pem, next_kid, "service:notification-service", policy, scope="users:read")
    assert (await client.get(f"/users/{user['id']}", headers=auth(as_service))).status == 401
    for state, (kid, pem) in copy.items():
        token = forged(pem, kid, user["id"], policy)
        assert (await client.get("/users/me", headers=auth(token))).status == 401, state
    assert (await client.get("/users/me", headers=auth(old_token))).status == 401

    jwks = await (await client.get("/.well-known/jwks.json")).json()
    published = {key["kid"] for key in jwks["keys"]}
    assert len(published) == 2 and not published & {kid for kid, _ in copy.values()}
    states = await key_states(db)
    assert all(states[kid] == "retired" for kid, _ in copy.values())
    fresh = (await login())["access_token"]
    assert jwt.get_unverified_header(fresh)["kid"] in published
    assert (await client.get("/users/me", headers=auth(fresh))).status == 200
    response = await client.post(
        "/auth/service-token", json={"client_id": "notification-service", "client_secret": SERVICE_SECRET}
    )
    service_token = (await response.json())["access_token"]
    assert (await client.get(f"/users/{user['id']}", headers=auth(service_token))).status == 200


async def test_after_the_recovery_no_rotation_or_repair_brings_a_leaked_key_back_to_sign(
    client: Client, register: Register, login: Login, db: aiopg.Pool
) -> None:
    # The ways a leaked next key used to come to sign: a rotation, forced as
    # the old procedure said, and ensure_keys promoting the next key when the
    # active row is deleted.
    await register()
    copy = {kid for kid, _ in (await leaked(db)).values()}
    await replace_compromised_keys(db)

    async def signing_kid() -> str:
        await client.app[VERIFIER].refresh(force=True)
        return str(jwt.get_unverified_header((await login())["access_token"])["kid"])

    assert await signing_kid() not in copy
    await rotate_keys(db, force=True)
    assert await signing_kid() not in copy
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("DELETE FROM signing_keys WHERE state = 'active'")
    await ensure_keys(db)
    assert await signing_kid() not in copy
    assert not copy & {kid for kid, state in (await key_states(db)).items() if state != "retired"}


async def test_a_recovery_racing_instances_that_start_leaves_one_active_and_one_next_key(
    aiohttp_client: AiohttpClient, settings: Settings, db: aiopg.Pool, redis: aioredis.Redis
) -> None:
    # Under the table lock rotate_keys and ensure_keys take, as they are: an
    # instance starting meanwhile neither makes a key of its own nor fails
    # on the one-active and one-next indexes.
    await ensure_keys(db)
    copy = await leaked(db)
    starting = [aiohttp_client(create_app(settings, register=False)) for _ in range(3)]
    async with asyncio.timeout(60):
        _, clients = await asyncio.gather(replace_compromised_keys(db), asyncio.gather(*starting))
    states = await key_states(db)
    assert sorted(state for state in states.values() if state != "retired") == ["active", "next"]
    assert all(states[kid] == "retired" for kid, _ in copy.values())
    for client in clients:
        await client.app[VERIFIER].refresh(force=True)
        kids = {key["kid"] for key in (await (await client.get("/.well-known/jwks.json")).json())["keys"]}
        assert kids == {kid for kid, state in states.items() if state != "retired"}


async def run_cli(*args: str, database_url: str) -> tuple[int, str, str]:
    """``python -m user_service ...`` as an operator runs it: exit status, stdout, stderr."""
    return await run_module("user_service", *args, env={"DATABASE_URL": database_url})


async def test_rotate_keys_compromised_from_the_command_line(settings: Settings, db: aiopg.Pool) -> None:
    await ensure_keys(db)
    copy = {kid for kid, _ in (await leaked(db)).values()}
    status, out, err = await run_cli("rotate-keys", "--compromised", database_url=settings.database_url)
    assert status == 0, err
    states = await key_states(db)
    assert states[out.strip()] == "active"  # it prints the kid that signs now, as rotate-keys does
    assert all(states[kid] == "retired" for kid in copy)

    # Retiring only the retiring keys is exactly what left a leaked next key signing.
    status, _, err = await run_cli("retire-keys", "--compromised", database_url=settings.database_url)
    assert status == 2 and "--compromised goes with rotate-keys" in err
    assert await key_states(db) == states
    # Nor is a kid given to rotate-keys ignored: it rotates whatever key signs.
    status, _, err = await run_cli("rotate-keys", "--kid", out.strip(), database_url=settings.database_url)
    assert status == 2 and "--kid goes with retire-keys" in err
    assert await key_states(db) == states
