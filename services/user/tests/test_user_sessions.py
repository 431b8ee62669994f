"""Logging in, refreshing, logging out, service tokens and signing keys."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TypedDict

import aiopg
import jwt
import pytest
import redis.asyncio as aioredis
from argon2 import PasswordHasher
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pytest_aiohttp import AiohttpClient

from mesh_common.auth import VERIFIER, JwksVerifier
from user_service import repository
from user_service.__main__ import manage_keys
from user_service.app import create_app
from user_service.keys import KEY_STORE
from user_service.settings import Settings
from user_service.signing_keys import (
    NEXT_KEY_MIN_AGE,
    KeyChangeRefused,
    KeyStore,
    ensure_keys,
    retire_keys,
    rotate_keys,
)

from .conftest import Auth, Client, Login, Register

PASSWORD = "a long and unusual passphrase"
SERVICE_SECRET = "notification-secret-0123456789"


async def test_login_accepts_the_username_or_the_email_in_any_case(register: Register, login: Login) -> None:
    await register("ada", "ada@example.com")
    for name in ("ada", "ADA", "Ada@Example.com"):
        assert (await login(name))["token_type"] == "Bearer"


async def test_access_tokens_are_short_lived_eddsa_jwts(client: Client, register: Register, login: Login) -> None:
    user = await register()
    tokens = await login()
    header = jwt.get_unverified_header(tokens["access_token"])
    claims = jwt.decode(tokens["access_token"], options={"verify_signature": False})
    jwks = await (await client.get("/.well-known/jwks.json")).json()
    assert header["alg"] == "EdDSA" and header["typ"] == "at+jwt"
    assert header["kid"] in {key["kid"] for key in jwks["keys"]}
    assert {"iss", "aud", "exp", "iat", "nbf", "sub", "jti"} <= claims.keys()
    assert claims["sub"] == user["id"]
    assert claims["exp"] - claims["iat"] == tokens["expires_in"] <= 15 * 60
    assert "." not in tokens["refresh_token"]  # opaque, not a JWT


async def test_the_jwks_publishes_only_public_ed25519_keys(client: Client) -> None:
    jwks = await (await client.get("/.well-known/jwks.json")).json()
    assert len(jwks["keys"]) == 2  # the active key, and the next one
    for key in jwks["keys"]:
        assert {key["kty"], key["crv"], key["alg"], key["use"]} == {"OKP", "Ed25519", "EdDSA", "sig"}
        assert "d" not in key


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


class HashParameters(TypedDict):
    """An older hash's costs, as ``PasswordHasher`` takes them."""

    time_cost: int
    memory_cost: int
    parallelism: int


@pytest.mark.parametrize(
    "old",
    [
        {"time_cost": 1, "memory_cost": 8192, "parallelism": 1},
        # Same strength, other timing: left as it was, a wrong password for
        # this account would answer in another time than an unknown name.
        {"time_cost": 2, "memory_cost": 19456, "parallelism": 2},
    ],
    ids=["weaker", "other lanes"],
)
async def test_an_old_hash_is_rehashed_at_login(
    client: Client, register: Register, login: Login, db: aiopg.Pool, old: HashParameters
) -> None:
    user = await register()
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "UPDATE users SET password_hash = %s WHERE id = %s", (PasswordHasher(**old).hash(PASSWORD), user["id"])
        )
        await login()
        await cur.execute("SELECT password_hash FROM users WHERE id = %s", (user["id"],))
        (rehashed,) = await cur.fetchone()
    assert rehashed.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    await login()


async def test_a_hash_of_a_password_as_typed_before_normalization_still_logs_in_and_is_rehashed(
    client: Client, register: Register, login: Login, db: aiopg.Pool
) -> None:
    typed = "cafe\u0301 au lait, sans sucre"  # a decomposed "é", hashed as it came before NFKC
    user = await register()
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "UPDATE users SET password_hash = %s WHERE id = %s",
            (PasswordHasher(memory_cost=19456).hash(typed), user["id"]),
        )
        await login(password=typed)
        await cur.execute("SELECT password_hash FROM users WHERE id = %s", (user["id"],))
        (rehashed,) = await cur.fetchone()
    assert PasswordHasher().verify(rehashed, "caf\u00e9 au lait, sans sucre")  # the normalized form, from now on
    await login(password=typed)


async def test_services_get_a_users_read_token_and_may_read_any_profile(
    client: Client, register: Register, auth: Auth
) -> None:
    ada = await register()
    response = await client.post(
        "/auth/service-token", json={"client_id": "notification-service", "client_secret": SERVICE_SECRET}
    )
    assert response.status == 200
    issued = await response.json()
    claims = jwt.decode(issued["access_token"], options={"verify_signature": False})
    assert claims["sub"] == "service:notification-service"
    assert claims["scope"] == issued["scope"] == "users:read"
    profile = await client.get(f"/users/{ada['id']}", headers=auth(issued["access_token"]))
    assert profile.status == 200
    assert await profile.json() == ada
    unknown = await client.get("/users/00000000-0000-0000-0000-000000000000", headers=auth(issued["access_token"]))
    assert unknown.status == 404
    assert (await unknown.json())["code"] == "USER_NOT_FOUND"
    # Other spellings of the same id that Python reads and PostgreSQL would not.
    for spelling in (f"urn:uuid:{ada['id']}", ada["id"].replace("-", ""), ada["id"].upper()):
        other = await client.get(f"/users/{spelling}", headers=auth(issued["access_token"]))
        assert (other.status, await other.json()) == (200, ada), spelling
    # A service has no profile of its own: its token is valid, for something else.
    assert (await client.get("/users/me", headers=auth(issued["access_token"]))).status == 403


async def test_wrong_client_credentials_are_refused(client: Client) -> None:
    for body in (
        {"client_id": "notification-service", "client_secret": "wrong-secret-0123456789"},
        {"client_id": "stranger", "client_secret": SERVICE_SECRET},
    ):
        response = await client.post("/auth/service-token", json=body)
        assert response.status == 401
        assert (await response.json())["code"] == "INVALID_CLIENT"


async def test_rotation_keeps_old_tokens_valid_until_the_old_key_is_retired(
    client: Client, register: Register, login: Login, auth: Auth, db: aiopg.Pool
) -> None:
    await register()
    old_token = (await login())["access_token"]
    old_kid = jwt.get_unverified_header(old_token)["kid"]
    verifier = client.app[VERIFIER]

    published = {key["kid"] for key in (await (await client.get("/.well-known/jwks.json")).json())["keys"]}
    new_kid = await rotate_keys(db, min_published=0)
    # Published before it signed: no verifier meets it first in a token.
    assert new_kid in published and new_kid != old_kid
    await verifier.refresh(force=True)  # what every instance does each SIGNING_KEY_REFRESH_SECONDS
    new_token = (await login())["access_token"]
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid
    kids = {key["kid"] for key in (await (await client.get("/.well-known/jwks.json")).json())["keys"]}
    next_kid = (kids - published).pop()
    assert kids == {old_kid, new_kid, next_kid}
    assert (await client.get("/users/me", headers=auth(old_token))).status == 200

    assert await retire_keys(db) == [old_kid]
    await verifier.refresh(force=True)
    kids = {key["kid"] for key in (await (await client.get("/.well-known/jwks.json")).json())["keys"]}
    assert kids == {new_kid, next_kid}
    assert (await client.get("/users/me", headers=auth(old_token))).status == 401
    assert (await client.get("/users/me", headers=auth(new_token))).status == 200


async def test_the_refresher_follows_a_rotation_made_elsewhere_reading_the_keys_once_a_round(
    aiohttp_client: AiohttpClient,
    settings: Settings,
    db: aiopg.Pool,
    redis: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tokens = dataclasses.replace(settings.tokens, key_refresh_interval=0.05)
    client = await aiohttp_client(create_app(dataclasses.replace(settings, tokens=tokens), register=False))
    await client.post("/users", json={"username": "ada", "email": "ada@example.com", "password": PASSWORD})
    counts = {"reads": 0, "refreshes": 0}
    read, refresh = KeyStore._read, JwksVerifier.refresh

    async def counted_read(store: KeyStore) -> list[tuple[str, str, str]]:
        counts["reads"] += 1
        return await read(store)

    async def counted_refresh(verifier: JwksVerifier, *, force: bool = False) -> None:
        counts["refreshes"] += 1
        await refresh(verifier, force=force)

    monkeypatch.setattr(KeyStore, "_read", counted_read)
    monkeypatch.setattr(JwksVerifier, "refresh", counted_refresh)
    new_kid = await rotate_keys(db, min_published=0)  # as another instance, or the CLI, would
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while client.app[KEY_STORE].active.kid != new_kid or counts["refreshes"] < 4:
        assert loop.time() < deadline, f"the refresher did not keep up: {counts}"
        await asyncio.sleep(0.02)
    response = await client.post("/auth/login", json={"username": "ada", "password": PASSWORD})
    assert jwt.get_unverified_header((await response.json())["access_token"])["kid"] == new_kid
    # One read of the key table a round (give or take the round under way):
    # the verifier's fetch is the load.
    assert abs(counts["reads"] - counts["refreshes"]) <= 1, counts


async def test_instances_starting_together_agree_on_one_signing_key(
    aiohttp_client: AiohttpClient, settings: Settings, db: aiopg.Pool, redis: aioredis.Redis
) -> None:
    clients = await asyncio.gather(*(aiohttp_client(create_app(settings, register=False)) for _ in range(3)))
    documents = [await (await c.get("/.well-known/jwks.json")).json() for c in clients]
    assert len(documents[0]["keys"]) == 2  # the active key, and the next one
    assert all(document == documents[0] for document in documents)
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT state, count(*) FROM signing_keys GROUP BY state ORDER BY state")
        assert await cur.fetchall() == [("active", 1), ("next", 1)]


async def test_a_rotation_with_no_next_key_is_refused_unless_forced(client: Client, db: aiopg.Pool) -> None:
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("DELETE FROM signing_keys WHERE state = 'next'")
        with pytest.raises(KeyChangeRefused, match="no next key"):
            await rotate_keys(db)
        kid = await rotate_keys(db, force=True)
        await cur.execute("SELECT state, kid = %s FROM signing_keys ORDER BY state", (kid,))
        assert await cur.fetchall() == [("active", True), ("next", False), ("retiring", False)]


async def test_a_second_rotation_in_a_row_is_refused(client: Client, db: aiopg.Pool) -> None:
    # Its next key was made a moment ago: a verifier that fetched the key set
    # just before would not know the key, and would answer its tokens 401.
    first = await rotate_keys(db, min_published=0)
    with pytest.raises(KeyChangeRefused, match=r"published \d+ s ago"):
        await rotate_keys(db)
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT kid FROM signing_keys WHERE state = 'active'")
        assert await cur.fetchall() == [(first,)]


async def test_a_key_that_stopped_signing_just_now_is_not_retired(client: Client, db: aiopg.Pool) -> None:
    old = client.app[KEY_STORE].active.kid
    new = await rotate_keys(db, min_published=0)
    with pytest.raises(KeyChangeRefused, match="stopped signing less than 630 s ago"):
        await retire_keys(db, min_retiring=630)
    with pytest.raises(KeyChangeRefused, match="not a retiring key"):
        await retire_keys(db, new, min_retiring=630)
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT state FROM signing_keys WHERE kid = %s", (old,))
        assert await cur.fetchone() == ("retiring",)
        await cur.execute("UPDATE signing_keys SET retiring_at = now() - interval '11 minutes' WHERE kid = %s", (old,))
    assert await retire_keys(db, min_retiring=630) == [old]


async def key_states(db: aiopg.Pool) -> dict[str, str]:
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT kid, state FROM signing_keys")
        return dict(await cur.fetchall())


async def test_rotate_keys_waits_for_instances_that_reread_the_keys_less_often(
    settings: Settings, db: aiopg.Pool
) -> None:
    # Published 370 s ago: past the 6 minutes that suit instances re-reading
    # the key table every 30 s. One re-reading every 120 s may have put the
    # key in its JWKS only 250 s ago, and a verifier's key set (up to 300 s
    # old) fetched from it just before would not have it.
    await ensure_keys(db)
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "UPDATE signing_keys SET created_at = now() - interval '370 seconds' WHERE state = 'next' RETURNING kid"
        )
        (next_kid,) = await cur.fetchone()
    slow = dataclasses.replace(settings.tokens, key_refresh_interval=120.0)

    with pytest.raises(SystemExit, match=r"rotate-keys: refused: the next key was published \d+ s ago"):
        await manage_keys(settings.database_url, "rotate-keys", None, tokens=slow, force=False)
    assert (await key_states(db))[next_kid] == "next"

    # At the default 30 s, the wait is still the 6 minutes it always was.
    assert (settings.tokens.key_refresh_interval, NEXT_KEY_MIN_AGE) == (30.0, 360.0)
    await manage_keys(settings.database_url, "rotate-keys", None, tokens=settings.tokens, force=False)
    assert (await key_states(db))[next_kid] == "active"


async def test_retire_keys_waits_for_service_tokens_that_outlive_access_tokens(
    settings: Settings, db: aiopg.Pool
) -> None:
    # Service tokens for 30 minutes, user tokens for the default 10: the
    # last service token the old key signed is valid until 30 minutes (and
    # the instances' re-read) after the rotation.
    tokens = dataclasses.replace(settings.tokens, service_ttl=1800)
    await ensure_keys(db)
    old = next(kid for kid, state in (await key_states(db)).items() if state == "active")
    await rotate_keys(db, min_published=0)
    async with db.acquire() as conn, conn.cursor() as cur:
        # Past ACCESS_TOKEN_TTL + SIGNING_KEY_REFRESH_SECONDS (630 s), all the old wait counted.
        await cur.execute("UPDATE signing_keys SET retiring_at = now() - interval '11 minutes' WHERE kid = %s", (old,))

    with pytest.raises(SystemExit, match="stopped signing less than 1830 s ago"):
        await manage_keys(settings.database_url, "retire-keys", None, tokens=tokens, force=False)
    assert (await key_states(db))[old] == "retiring"

    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("UPDATE signing_keys SET retiring_at = now() - interval '31 minutes' WHERE kid = %s", (old,))
    await manage_keys(settings.database_url, "retire-keys", None, tokens=tokens, force=False)
    assert (await key_states(db))[old] == "retired"


async def test_with_its_active_key_deleted_the_published_next_key_signs(
    client: Client, register: Register, login: Login, db: aiopg.Pool
) -> None:
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT kid FROM signing_keys WHERE state = 'next'")
        (next_kid,) = await cur.fetchone()
        await cur.execute("DELETE FROM signing_keys WHERE state = 'active'")
    await client.app[KEY_STORE].load()
    await register()
    assert jwt.get_unverified_header((await login())["access_token"])["kid"] == next_kid


async def test_a_deleted_active_key_is_replaced_at_the_next_refresh(
    client: Client, register: Register, login: Login, auth: Auth, db: aiopg.Pool
) -> None:
    await register()
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("DELETE FROM signing_keys")
    await client.app[VERIFIER].refresh(force=True)
    token = (await login())["access_token"]
    assert (await client.get("/users/me", headers=auth(token))).status == 200


async def test_a_stronger_hash_is_kept_at_login(
    client: Client, register: Register, login: Login, db: aiopg.Pool
) -> None:
    # Made with more than the settings ask (say, before they were lowered):
    # a login must not quietly re-hash it with the weaker ones.
    user = await register()
    strong = PasswordHasher(time_cost=3, memory_cost=24576, parallelism=1).hash(PASSWORD)
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("UPDATE users SET password_hash = %s WHERE id = %s", (strong, user["id"]))
        await login()
        await cur.execute("SELECT password_hash FROM users WHERE id = %s", (user["id"],))
        assert await cur.fetchone() == (strong,)


async def test_a_rehash_for_other_lanes_keeps_a_stronger_hash_strong(
    client: Client, register: Register, login: Login, db: aiopg.Pool
) -> None:
    # Two lanes where the settings say one: rehashed for the lanes, but with
    # its own memory and passes, not the settings' lower ones.
    user = await register()
    strong = PasswordHasher(time_cost=3, memory_cost=24576, parallelism=2).hash(PASSWORD)
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("UPDATE users SET password_hash = %s WHERE id = %s", (strong, user["id"]))
        await login()
        await cur.execute("SELECT password_hash FROM users WHERE id = %s", (user["id"],))
        (rehashed,) = await cur.fetchone()
    assert rehashed.startswith("$argon2id$v=19$m=24576,t=3,p=1$")
    await login()


async def test_a_rehash_does_not_overwrite_a_hash_changed_since_it_was_verified(
    client: Client, register: Register, db: aiopg.Pool
) -> None:
    user = await register()
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT password_hash FROM users WHERE id = %s", (user["id"],))
        (current,) = await cur.fetchone()
        verified_against = PasswordHasher(time_cost=1, memory_cost=8192).hash(PASSWORD)
        written = await repository.set_password_hash(db, user["id"], "$argon2id$stale", replacing=verified_against)
        await cur.execute("SELECT password_hash FROM users WHERE id = %s", (user["id"],))
        assert (written, await cur.fetchone()) == (False, (current,))
        assert await repository.set_password_hash(db, user["id"], "$argon2id$new", replacing=current)


async def test_a_key_replaced_under_its_kid_is_the_one_published_after_the_next_read(
    client: Client, db: aiopg.Pool
) -> None:
    # A restore, or a repair after a leak: the row keeps its kid, the key is new.
    store = client.app[KEY_STORE]
    kid = store.active.kid
    replacement = Ed25519PrivateKey.generate()
    pem = replacement.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("UPDATE signing_keys SET private_key_pem = %s WHERE kid = %s", (pem, kid))
    await store.load()
    jwks = await (await client.get("/.well-known/jwks.json")).json()
    (published,) = [key for key in jwks["keys"] if key["kid"] == kid]
    expected = jwt.algorithms.OKPAlgorithm.to_jwk(replacement.public_key(), as_dict=True)
    assert published["x"] == expected["x"]
