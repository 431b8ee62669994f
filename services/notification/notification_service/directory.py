"""Where to send a user's email: asked of the user-service, as a service.

The user-service is found through Consul, like every other call between
services, with per-instance breakers and a deadline (``ServiceClient``).
It answers ``GET /users/{id}`` to a service token with the ``users:read``
scope, which we get from ``POST /auth/service-token`` and keep until shortly
before it expires.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import structlog

from mesh_common.discovery import NoInstances, ServiceWatch
from mesh_common.http import ServiceClient, UpstreamStatusError
from mesh_common.resilience import UpstreamFailure

from .failures import UserServiceUnavailable

log = structlog.get_logger()

# Failures that mean "not now": no healthy instance, every breaker open,
# refused, 5xx, or past the deadline.
UNAVAILABLE = (NoInstances, UpstreamFailure, TimeoutError)
# The problem's code in the user-service's 404 to GET /users/{id} for an id it does not know.
USER_NOT_FOUND = "USER_NOT_FOUND"


class TokenRejected(Exception):
    """The user-service answered 401 to our service token."""


@dataclass(frozen=True, slots=True)
class Recipient:
    email: str
    name: str
    # Whether the user-service says its owner proved they read it. Unverified
    # unless it says so: a user-service that does not say blocks, not leaks.
    verified: bool = False


class ServiceTokens:
    """One service token at a time, fetched on demand and refreshed early.

    A lock makes the many deliveries that start together (a prefetch's worth)
    wait for one fetch instead of each asking for its own token.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        client: ServiceClient,
        watches: Mapping[str, ServiceWatch],
        *,
        service: str,
        client_id: str,
        client_secret: str,
        deadline: float = 2.0,
    ) -> None:
        self._session = session
        self._client = client
        self._watches = watches
        self._service = service
        self._credentials = {"client_id": client_id, "client_secret": client_secret}
        self._deadline = deadline
        self._token: str | None = None
        self._refresh_at = 0.0
        self._lock = asyncio.Lock()

    async def get(self) -> str:
        async with self._lock:
            if self._token is None or time.monotonic() >= self._refresh_at:
                self._token, lifetime = await self._fetch()
                # Refresh well before expiry, so that a token never expires
                # between our check and the user-service's.
                self._refresh_at = time.monotonic() + lifetime - min(60.0, lifetime / 2)
                log.info("service_token_obtained", expires_in=lifetime)
            return self._token

    def forget(self, token: str) -> None:
        """Drop ``token`` after the user-service refused it (a key rotation, a restart)."""
        if self._token == token:
            self._token = None

    async def _fetch(self) -> tuple[str, float]:
        # A token request changes nothing on the server, so it is safe to
        # send anywhere; it goes through the same breakers as our GETs.
        instance = self._client.breakers.pick(self._watches[self._service])
        with self._client.breakers.breaker(instance.id):
            try:
                async with (
                    asyncio.timeout(self._deadline),
                    self._session.post(f"{instance.base_url}/auth/service-token", json=self._credentials) as resp,
                ):
                    if resp.status >= 500:
                        raise UpstreamFailure(f"{instance.id} answered {resp.status}")
                    body: Any = await resp.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                raise UpstreamFailure(f"{instance.id}: {type(exc).__name__}") from exc
        token = body.get("access_token") if isinstance(body, dict) else None
        lifetime = body.get("expires_in") if isinstance(body, dict) else None
        if resp.status != 200 or not isinstance(token, str) or not isinstance(lifetime, int | float):
            # Wrong credentials are a configuration error; retrying later
            # keeps the events until someone fixes it.
            log.error("service_token_refused", status=resp.status, client_id=self._credentials["client_id"])
            raise UserServiceUnavailable(f"service token refused with {resp.status}")
        return token, float(lifetime)


class UserDirectory:
    def __init__(self, client: ServiceClient, tokens: ServiceTokens, *, service: str) -> None:
        self._client = client
        self._tokens = tokens
        self._service = service

    async def recipient(self, user_id: str) -> Recipient | None:
        """The user's address, and whether it is verified; ``None`` if the user-service does not know them (any more).

        One lookup for both, so that the flag is the one of this address:
        read apart, an address changed in between could pass as verified.
        """
        try:
            user = await self._get_user(user_id)
        except UNAVAILABLE as exc:
            raise UserServiceUnavailable(type(exc).__name__) from exc
        if user is None:
            return None
        try:
            return Recipient(
                email=str(user["email"]),
                name=str(user.get("display_name") or user["username"]),
                verified=user.get("email_verified") is True,
            )
        except (KeyError, TypeError):
            raise UserServiceUnavailable("the user-service answered without an email") from None

    async def _get_user(self, user_id: str) -> dict[str, Any] | None:
        token = await self._tokens.get()
        try:
            return await self._lookup(user_id, token)
        except TokenRejected:
            # Expired early, or signed by a key the user-service retired:
            # one fresh token, once.
            self._tokens.forget(token)
        try:
            return await self._lookup(user_id, await self._tokens.get())
        except TokenRejected:
            raise UserServiceUnavailable("the user-service refuses our service token") from None

    async def _lookup(self, user_id: str, token: str) -> dict[str, Any] | None:
        path = f"/users/{quote(user_id, safe='')}"
        try:
            user = await self._client.get_json(self._service, path, headers={"Authorization": f"Bearer {token}"})
        except UpstreamStatusError as exc:
            # Only the user-service's own problem for an unknown id: a 404
            # from a proxy, or for a path an instance does not serve, says
            # nothing of the user, and taken so it skipped their email and
            # cancelled their reminder for good.
            if exc.status == 404 and isinstance(exc.body, dict) and exc.body.get("code") == USER_NOT_FOUND:
                return None
            if exc.status == 401:
                raise TokenRejected() from None
            log.error("user_lookup_refused", status=exc.status)
            raise UserServiceUnavailable(f"user lookup refused with {exc.status}") from None
        if not isinstance(user, dict):
            # Only a 404 means "no such user": an empty or odd 2xx must not
            # get the email skipped as if the user were gone.
            raise UserServiceUnavailable("the user-service answered without a user")
        return user
