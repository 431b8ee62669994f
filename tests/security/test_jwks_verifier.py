"""The JWKS verifier when the key set is missing, stale, or changed under a kid.

A 401 tells a client to log its user out, so it must mean "this token is
bad", never "the user-service is down". Keys are refreshed without making
requests wait, yet a retired key stops verifying within ``max_key_age``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from mesh_common.auth import VERIFIER, auth_middleware
from mesh_common.jwks import JwksVerifier
from mesh_common.problems import Problem, problem_middleware
from mesh_common.testing import TokenFactory, eventually

MAX_KEY_AGE = 300.0


class Clock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class UserService:
    """The JWKS endpoint as the verifier sees it: up or down, fast or held."""

    def __init__(self, tokens: TokenFactory) -> None:
        self.tokens = tokens
        self.up = True
        self.fetches = 0
        self.held: asyncio.Event | None = None
        self.answer: dict[str, Any] | None = None  # what it answers instead of its key set

    async def fetch(self) -> dict[str, Any]:
        self.fetches += 1
        if self.held is not None:
            await self.held.wait()
        if not self.up:
            raise ConnectionRefusedError("user-service is down")
        return self.tokens.jwks() if self.answer is None else self.answer


@pytest.fixture
def tokens() -> TokenFactory:
    return TokenFactory()


@pytest.fixture
def users(tokens: TokenFactory) -> UserService:
    return UserService(tokens)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def verifier(tokens: TokenFactory, users: UserService, clock: Clock) -> AsyncIterator[JwksVerifier]:
    verifier = JwksVerifier(
        users.fetch, issuer=tokens.issuer, audience=tokens.audience, max_key_age=MAX_KEY_AGE, clock=clock
    )
    yield verifier
    await verifier.close()


async def refusal(verify: Callable[[], Any]) -> Problem:
    with pytest.raises(Problem) as refused:
        await verify()
    return refused.value


async def guarded(aiohttp_client: AiohttpClient, verifier: JwksVerifier) -> TestClient[web.Request, web.Application]:
    """A client of an app whose one route, ``/thing``, needs a token."""

    async def thing(request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application(middlewares=[problem_middleware, auth_middleware()])
    app.router.add_get("/thing", thing, name="thing")
    app[VERIFIER] = verifier
    return await aiohttp_client(app)


async def test_a_valid_token_is_a_503_not_a_401_while_the_key_set_cannot_be_fetched(
    aiohttp_client: Any, tokens: TokenFactory, users: UserService, clock: Clock, verifier: JwksVerifier
) -> None:
    client = await guarded(aiohttp_client, verifier)
    users.up = False  # down since before the first token came

    first = await client.get("/thing", headers=tokens.headers())
    again = await client.get("/thing", headers=tokens.headers())  # within the cool-down: no new fetch
    malformed = await client.get("/thing", headers={"Authorization": "Bearer not-a-token"})

    for response in (first, again):
        assert response.status == 503
        assert response.content_type == "application/problem+json"
        assert (await response.json())["code"] == "TOKEN_KEYS_UNAVAILABLE"
        assert int(response.headers["Retry-After"]) >= 1
    assert malformed.status == 401  # a bad token is still a bad token
    assert users.fetches == 1

    users.up = True
    clock.now += 5  # the cool-down
    assert (await client.get("/thing", headers=tokens.headers())).status == 200


@pytest.mark.parametrize(
    "answer",
    [
        {"keys": []},
        {},
        {"keys": "none"},
        {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "AAAA", "kid": "k1", "use": "sig"}]},  # no "alg"
        {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "AAAA", "kid": "k1", "alg": "Ed25519"}]},  # RFC 9864's name
    ],
    ids=["empty", "no-keys", "not-a-list", "no-alg", "other-alg"],
)
async def test_a_key_set_without_a_usable_key_keeps_the_keys_in_hand(
    answer: dict[str, Any],
    aiohttp_client: Any,
    tokens: TokenFactory,
    users: UserService,
    clock: Clock,
    verifier: JwksVerifier,
) -> None:
    client = await guarded(aiohttp_client, verifier)
    assert (await client.get("/thing", headers=tokens.headers())).status == 200

    # Something else answers under the user-service's name: taken as the key
    # set, it would make every token's key unknown, a 401 for every user.
    users.answer = answer
    clock.now += MAX_KEY_AGE + 1
    with structlog.testing.capture_logs() as logs:
        response = await client.get("/thing", headers=tokens.headers())  # a new token: none remembered
    assert response.status == 200  # the keys in hand still verify
    assert [entry["event"] for entry in logs].count("jwks_refresh_failed") == 1
    clock.now += 5  # the cool-down: and it counts as failing, so requests do not wait for the next fetch
    assert (await client.get("/thing", headers=tokens.headers())).status == 200


async def test_a_token_of_bytes_that_are_not_utf8_is_a_401(aiohttp_client: Any, verifier: JwksVerifier) -> None:
    client = await guarded(aiohttp_client, verifier)
    # Raw bytes: no HTTP client sends these, but anyone can.
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(b"GET /thing HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe.a.b\r\nConnection: close\r\n\r\n")
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 "), answer[:200]
    assert b"application/problem+json" in head
    assert b'"INVALID_TOKEN"' in body


async def test_an_unknown_kid_is_a_401_only_when_a_fresh_key_set_says_so(
    tokens: TokenFactory, users: UserService, clock: Clock, verifier: JwksVerifier
) -> None:
    await verifier.verify(tokens.token())
    stranger = TokenFactory()  # a kid the user-service never published

    assert (await refusal(lambda: verifier.verify(stranger.token()))).status == 401

    users.up = False
    clock.now += 5  # past the cool-down: the fetch for the unknown kid fails
    unavailable = await refusal(lambda: verifier.verify(stranger.token()))
    assert (unavailable.status, unavailable.code) == (503, "TOKEN_KEYS_UNAVAILABLE")
    await verifier.verify(tokens.token())  # known keys still verify meanwhile


async def test_a_key_replaced_under_its_kid_no_longer_verifies_its_remembered_tokens(
    tokens: TokenFactory, verifier: JwksVerifier
) -> None:
    token = tokens.token()
    await verifier.verify(token)
    replacement = TokenFactory()
    tokens.key = replacement.key  # same kid, other key material

    await verifier.refresh(force=True)

    assert (await refusal(lambda: verifier.verify(token))).status == 401
    await verifier.verify(tokens.token())


async def test_stale_keys_are_refreshed_in_the_background_while_requests_go_on(
    tokens: TokenFactory, users: UserService, clock: Clock, verifier: JwksVerifier
) -> None:
    old_token = tokens.token()
    await verifier.verify(old_token)
    users.tokens = TokenFactory()  # rotated and retired: the old kid leaves the JWKS
    users.held = asyncio.Event()  # the next fetch takes its time

    clock.now += MAX_KEY_AGE * 0.75
    # Served at once with the keys at hand, while the fetch is held.
    await asyncio.wait_for(verifier.verify(old_token), timeout=1)
    await eventually(lambda: users.fetches == 2)

    users.held.set()
    await verifier.refresh()  # waits for the fetch in flight (the lock), then skips it: the cool-down
    assert (await refusal(lambda: verifier.verify(old_token))).status == 401


async def test_a_background_refresh_runs_outside_the_context_of_the_request_that_started_it(
    tokens: TokenFactory, clock: Clock
) -> None:
    seen: list[dict[str, Any]] = []

    async def fetch() -> dict[str, Any]:
        seen.append(structlog.contextvars.get_contextvars())
        return tokens.jwks()

    verifier = JwksVerifier(fetch, issuer=tokens.issuer, audience=tokens.audience, max_key_age=MAX_KEY_AGE, clock=clock)
    try:
        token = tokens.token()
        await verifier.verify(token)
        clock.now += MAX_KEY_AGE * 0.75  # stale: the next verify starts a fetch and does not wait for it
        with structlog.contextvars.bound_contextvars(request_id="someone-elses"):
            await verifier.verify(token)
        await eventually(lambda: len(seen) == 2)
    finally:
        await verifier.close()
    assert seen[1] == {}  # its log lines are its own, not under that request's id


async def test_closing_is_cancelled_by_its_callers_cancellation(tokens: TokenFactory, clock: Clock) -> None:
    # A fetch that outlives its cancellation (on Python 3.11 one through
    # aiopg can): close() waited for it under suppress(CancelledError), which
    # swallowed the cancellation of the shutdown that called it too.
    fetching, swallowing, release = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def fetch() -> dict[str, Any]:
        if fetching.is_set():  # the second: started in the background
            try:
                await release.wait()
            except asyncio.CancelledError:
                swallowing.set()
                await release.wait()  # swallowed, and on
        fetching.set()
        return tokens.jwks()

    verifier = JwksVerifier(fetch, issuer=tokens.issuer, audience=tokens.audience, max_key_age=MAX_KEY_AGE, clock=clock)
    token = tokens.token()
    await verifier.verify(token)
    clock.now += MAX_KEY_AGE * 0.75  # stale: the next verify starts a fetch in the background
    await verifier.verify(token)
    closing = asyncio.create_task(verifier.close())
    try:
        await eventually(swallowing.is_set)  # close() cancelled the fetch, and waits for it
        closing.cancel()
        await asyncio.wait({closing}, timeout=5)
        assert closing.cancelled()
    finally:
        release.set()
        await verifier.close()


async def test_a_retired_key_stops_verifying_within_max_key_age_even_after_a_quiet_spell(
    tokens: TokenFactory, users: UserService, clock: Clock, verifier: JwksVerifier
) -> None:
    old_token = tokens.token()
    await verifier.verify(old_token)
    users.tokens = TokenFactory()  # rotated and retired

    clock.now += MAX_KEY_AGE + 1  # no request meanwhile, so no background refresh either

    assert (await refusal(lambda: verifier.verify(old_token))).status == 401


async def test_while_the_jwks_cannot_be_fetched_stale_keys_keep_serving_without_waiting(
    tokens: TokenFactory, users: UserService, clock: Clock, verifier: JwksVerifier
) -> None:
    token = tokens.token()
    await verifier.verify(token)
    users.up = False
    clock.now += MAX_KEY_AGE * 0.75
    await verifier.verify(token)
    await eventually(lambda: users.fetches == 2)
    await verifier.refresh()  # waits for that background fetch to fail, then skips: the cool-down

    users.held = asyncio.Event()  # from now on a fetch hangs, as on a dead host
    clock.now += MAX_KEY_AGE
    await asyncio.wait_for(verifier.verify(tokens.token()), timeout=1)
    await eventually(lambda: users.fetches == 3)  # tried again, in the background
    users.held.set()
    await verifier.refresh()
