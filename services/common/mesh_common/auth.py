"""The request's side of authentication: its bearer token, who it is, and which routes need one.

The token itself is checked by ``jwks.JwksVerifier``, kept on the app
(``VERIFIER``): every service and the gateway verify tokens themselves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from .app import CleanupCtx
from .http import SERVICE_CLIENT
from .jwks import JwksVerifier, Principal
from .problems import Handler, Unauthorized

PRINCIPAL = web.RequestKey("mesh.principal", Principal)
VERIFIER = web.AppKey("mesh.jwks_verifier", JwksVerifier)


def bearer_token(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def authenticate(request: web.Request) -> Principal:
    """The caller behind the request's bearer token, stored as ``request[PRINCIPAL]``; or a 401."""
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("A bearer token is required")
    principal = await request.app[VERIFIER].verify(token)
    request[PRINCIPAL] = principal
    structlog.contextvars.bind_contextvars(user=principal.subject)
    return principal


def auth_middleware(public: Collection[tuple[str, str]] = ()) -> Middleware:
    """Require a valid access token on every route but health, docs and ``public``.

    ``public`` holds (method, route name) pairs, so that the list survives
    path changes and is checked against the resolved route, not a prefix.
    A HEAD is public where its GET is, as aiohttp serves one for the other.
    A request no route takes gets the router's 404 or 405 (with ``Allow``),
    token or not: told to sign in, a client would not learn that it used
    the wrong method.
    """
    open_routes = {"health", "health.live", "openapi"}

    @web.middleware
    async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        route_name = request.match_info.route.name
        method = "GET" if request.method == "HEAD" else request.method
        routed = request.match_info.http_exception is None
        if routed and not (route_name in open_routes or (method, route_name) in public):
            await authenticate(request)
        return await handler(request)

    return require_token


def jwks_ctx(*, issuer: str, audience: str, service: str = "user-service") -> CleanupCtx:
    """A cleanup context with a verifier that fetches the JWKS through Consul.

    Needs ``watch_services_ctx(service)`` and ``http_session_ctx`` before it.
    The first fetch happens on the first token, not at start-up, so that a
    service can start while the user-service is still coming up.
    """

    @asynccontextmanager
    async def open_verifier(app: web.Application) -> AsyncIterator[None]:
        client = app[SERVICE_CLIENT]

        async def fetch() -> dict[str, Any]:
            jwks: dict[str, Any] = await client.get_json(service, "/.well-known/jwks.json")
            return jwks

        app[VERIFIER] = verifier = JwksVerifier(fetch, issuer=issuer, audience=audience)
        yield
        await verifier.close()

    return open_verifier
