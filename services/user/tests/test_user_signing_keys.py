"""Signing keys: the published key set, rotating and retiring keys, and how every instance follows the key table."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import aiopg
import jwt
import pytest
import redis.asyncio as aioredis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pytest_aiohttp import AiohttpClient

from mesh_common.auth import VERIFIER
from mesh_common.jwks import ACCESS_TOKEN_TYPE, InvalidToken, JwksVerifier
from user_service import contexts
from user_service.__main__ import manage_keys
from user_service.app import create_app
from user_service.keys import KEY_STORE
from user_service.settings import Settings, TokenPolicy
from user_service.signing_keys import (
    ALGORITHM,
    NEXT_KEY_MIN_AGE,
    PUBLICATION_MARGIN,
    VERIFIER_LEEWAY,
    KeyChangeRefused,
    KeyStore,
    SigningKey,
    ensure_keys,
    retire_keys,
    retiring_min_age,
    rotate_keys,
)

from .conftest import PASSWORD, Auth, Client, Login, Register


async def test_the_jwks_publishes_only_public_ed25519_keys(client: Client) -> None:
    jwks = await (await client.get("/.well-known/jwks.json")).json()
    assert len(jwks["keys"]) == 2  # the active key, and the next one
    for key in jwks["keys"]:
        assert {key["kty"], key["crv"], key["alg"], key["use"]} == {"OKP", "Ed25519", "EdDSA", "sig"}
        assert "d" not in key


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
        # Past what ACCESS_TOKEN_TTL alone would ask (660 s), all the old wait counted.
        await cur.execute("UPDATE signing_keys SET retiring_at = now() - interval '12 minutes' WHERE kid = %s", (old,))

    with pytest.raises(SystemExit, match="stopped signing less than 1860 s ago"):
        await manage_keys(settings.database_url, "retire-keys", None, tokens=tokens, force=False)
    assert (await key_states(db))[old] == "retiring"

    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("UPDATE signing_keys SET retiring_at = now() - interval '32 minutes' WHERE kid = %s", (old,))
    await manage_keys(settings.database_url, "retire-keys", None, tokens=tokens, force=False)
    assert (await key_states(db))[old] == "retired"


def test_a_retiring_key_outlasts_its_last_token_by_the_margin_and_the_verifiers_leeway() -> None:
    # The last token an instance signs before it re-reads the table may be
    # signed late (a slow re-read: the margin), and verifiers take it for
    # their leeway past its exp: retired sooner, it is refused while valid.
    assert (PUBLICATION_MARGIN, VERIFIER_LEEWAY) == (25.0, 5.0)
    assert retiring_min_age(TokenPolicy()) == 600 + 30 + PUBLICATION_MARGIN + VERIFIER_LEEWAY == 660
    assert retiring_min_age(TokenPolicy(service_ttl=1800)) == 1800 + 30 + 25 + 5


@pytest.mark.parametrize(("expired_ago", "accepted"), [(VERIFIER_LEEWAY - 1, True), (VERIFIER_LEEWAY + 1, False)])
async def test_the_leeway_counted_is_the_one_verifiers_give(expired_ago: float, accepted: bool) -> None:
    # The verifier is given the leeway the retiring wait counts on.
    key = SigningKey("leeway", Ed25519PrivateKey.generate(), "active")
    policy = TokenPolicy()

    async def fetch() -> dict[str, Any]:
        return {"keys": [key.public_jwk()]}

    verifier = JwksVerifier(fetch, issuer=policy.issuer, audience=policy.audience)
    now = int(time.time())
    claims = {"iss": policy.issuer, "aud": policy.audience, "sub": "ada", "jti": "j", "iat": now - 600}
    token = jwt.encode(
        {**claims, "nbf": now - 600, "exp": now - int(expired_ago)},
        key.private_key,
        algorithm=ALGORITHM,
        headers={"kid": key.kid, "typ": ACCESS_TOKEN_TYPE},
    )
    await verifier.refresh(force=True)
    if accepted:
        assert (await verifier.verify(token)).subject == "ada"
    else:
        with pytest.raises(InvalidToken, match="expired"):
            await verifier.verify(token)
    await verifier.close()


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


async def test_a_refresh_that_swallows_the_shutdowns_cancellation_does_not_hold_the_shutdown(
    aiohttp_client: AiohttpClient,
    settings: Settings,
    redis: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # On Python 3.11 aiopg turns a cancellation that arrives as its answer
    # does into that answer (asyncio.wait_for): the refresher, stopped by a
    # cancellation alone, went back to sleep, and the shutdown waited on it
    # for ever.
    monkeypatch.setattr(contexts, "KEY_REFRESH_GRACE", 0.2)
    tokens = dataclasses.replace(settings.tokens, key_refresh_interval=0.05)
    client = await aiohttp_client(create_app(dataclasses.replace(settings, tokens=tokens), register=False))
    refreshing, swallowed = asyncio.Event(), asyncio.Event()

    async def swallowing_refresh(verifier: JwksVerifier, *, force: bool = False) -> None:
        refreshing.set()
        try:
            await asyncio.Event().wait()  # held until cancelled
        except asyncio.CancelledError:
            if swallowed.is_set():
                raise
            swallowed.set()

    monkeypatch.setattr(JwksVerifier, "refresh", swallowing_refresh)
    async with asyncio.timeout(5):
        await refreshing.wait()
    loop = asyncio.get_running_loop()
    started = loop.time()
    # The shutdown's own cancellation by this bound was swallowed too (by
    # the old cleanup's suppress), so it is the time taken that tells.
    async with asyncio.timeout(5):
        await client.close()
    assert loop.time() - started < 3, "the shutdown waited for the refresher"
    assert swallowed.is_set()


async def test_a_failed_reread_of_the_keys_is_tried_again_within_seconds_not_an_interval() -> None:
    # A retirement's margin allows for a re-read that failed for a few
    # seconds: one left for a whole interval more kept signing with the old
    # key past the point retire-keys counts on.
    loop = asyncio.get_running_loop()
    reads: list[float] = []
    done = asyncio.Event()

    class Store:
        async def load(self) -> None:
            reads.append(loop.time())
            if len(reads) == 1:
                raise ConnectionError("the database is briefly gone")
            if len(reads) == 3:
                done.set()

    class Verifier:
        async def refresh(self, *, force: bool = False) -> None:
            pass

    interval = 1.0
    refresher = contexts.KeyRefresher(Store(), Verifier(), interval, own=False, retry=0.05)  # type: ignore[arg-type]
    running = asyncio.create_task(refresher.run())
    try:
        async with asyncio.timeout(10):
            await done.wait()
    finally:
        refresher.stop()
        await running
    failed, again, next_round = reads
    assert again - failed < interval / 2
    assert next_round - again >= interval * 0.9  # and once it succeeded, back to the interval
