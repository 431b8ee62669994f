"""Cleanup contexts for what only the user-service has: hashing, Redis and the login throttle, keys."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aioredis
import structlog
from aiohttp import web

from mesh_common.app import CleanupCtx, wait_event, worker_ctx
from mesh_common.auth import VERIFIER
from mesh_common.db import DB
from mesh_common.health import add_health_check
from mesh_common.jwks import JwksVerifier
from mesh_common.transactions import server_cancels_as_errors

from .keys import KEY_STORE, PASSWORDS, REDIS, SETTINGS, THROTTLE, TOKENS
from .passwords import Passwords, load_common_passwords, lower_thread_priority
from .signing_keys import KeyStore
from .throttle import LoginThrottle, load_throttle_key
from .tokens import TokenIssuer

log = structlog.get_logger()

# How long a refresh under way on shutdown may take to end: one read of the
# key table.
KEY_REFRESH_GRACE = 5.0
# How soon a failed re-read of the key table is tried again (at most the interval).
REFRESH_RETRY = 5.0


@asynccontextmanager
async def open_passwords(app: web.Application) -> AsyncIterator[None]:
    policy = app[SETTINGS].passwords
    executor = ThreadPoolExecutor(
        max_workers=policy.workers,
        thread_name_prefix="argon2",
        initializer=lower_thread_priority,
        initargs=(policy.nice,),
    )
    try:
        passwords = Passwords(policy, executor, load_common_passwords())
        await passwords.prepare()
        app[PASSWORDS] = passwords
        yield
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def redis_ctx(url: str) -> CleanupCtx:
    """One Redis client (with its pool), whose outage does not fail readiness (see health.py).

    Only logins need Redis (their throttle), and they answer 503 without it;
    profiles, refreshes and the key set go on.
    """

    @asynccontextmanager
    async def open_redis(app: web.Application) -> AsyncIterator[None]:
        client = aioredis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        app[REDIS] = client
        add_health_check(app, "redis", client.ping, required=False)
        try:
            yield
        finally:
            await client.aclose()

    return open_redis


@asynccontextmanager
async def open_login_throttle(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    secret = await load_throttle_key(app[DB])
    app[THROTTLE] = LoginThrottle(app[REDIS], settings.throttle, settings.redis_prefix, secret)
    yield


def signing_keys_ctx(verifier: JwksVerifier | None = None) -> CleanupCtx:
    """Signing keys from the database, and the verifier every request goes through.

    The verifier is mesh_common's, like in every other service; only its
    fetch differs: it reads our own key table instead of calling us over HTTP.
    """

    @asynccontextmanager
    async def open_signing_keys(app: web.Application) -> AsyncIterator[None]:
        policy = app[SETTINGS].tokens
        store = KeyStore(app[DB])
        await store.load()  # which makes the keys a new table lacks

        async def fetch() -> dict[str, Any]:
            with server_cancels_as_errors():  # a failed fetch, which the verifier knows how to take
                await store.load()
            return store.jwks()

        app[KEY_STORE] = store
        app[TOKENS] = TokenIssuer(store, policy)
        app[VERIFIER] = verifier or JwksVerifier(fetch, issuer=policy.issuer, audience=policy.audience)
        await app[VERIFIER].refresh(force=True)
        refreshing = worker_ctx(
            "signing-keys-refresh",
            lambda _: KeyRefresher(store, app[VERIFIER], policy.key_refresh_interval, own=verifier is None),
            grace=KEY_REFRESH_GRACE,
        )
        try:
            async with refreshing(app):
                yield
        finally:
            await app[VERIFIER].close()

    return open_signing_keys


class KeyRefresher:
    """Reads the key table again every ``interval``, until told to stop.

    A rotation or retirement made by another instance (or the CLI) reaches
    this one within ``interval``: new tokens are signed with the new key, and
    a retired key stops verifying.
    """

    def __init__(
        self, store: KeyStore, verifier: JwksVerifier, interval: float, *, own: bool, retry: float = REFRESH_RETRY
    ) -> None:
        self._store = store
        self._verifier = verifier
        self._interval = interval
        self._retry = min(retry, interval)
        self._own = own
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        # A flag as well as the cancellation that follows it: on Python 3.11
        # aiopg can swallow a cancellation that arrives as a read of the key
        # table completes, and the loop went on, holding up the shutdown.
        self._stopping.set()

    async def run(self) -> None:
        wait = self._interval
        while not await wait_event(self._stopping, wait):
            wait = self._interval
            try:
                with server_cancels_as_errors():
                    if not self._own:
                        # An injected verifier fetches elsewhere; our own
                        # reads the key table through the store, so once is enough.
                        await self._store.load()
                    await self._verifier.refresh(force=True)
            except Exception as exc:  # the database is briefly gone: keep the keys we have
                log.warning("signing_keys_refresh_failed", error=type(exc).__name__)
                # Again soon, not an interval on: a retirement's margin
                # (signing_keys.PUBLICATION_MARGIN) allows for a re-read that
                # failed for seconds, not for another whole interval.
                wait = self._retry
