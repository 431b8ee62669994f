"""``create_app``: the gateway's factory. Sync, with no side effects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from mesh_common.app import service_app
from mesh_common.auth import VERIFIER, jwks_ctx
from mesh_common.consul import consul_ctx
from mesh_common.discovery import WATCHES, watch_services_ctx
from mesh_common.http import http_session_ctx
from mesh_common.jwks import JwksVerifier
from mesh_common.registration import registration_ctx
from mesh_common.resilience import BreakerBoard

from .guard import add_rate_limit_headers, guard_middleware
from .keys import BREAKERS, PROXY, RATE_LIMITER, ROUTE_TABLE, SETTINGS, UPSTREAM
from .proxy import Proxy
from .ratelimit import Limits, RateLimiter
from .routes import API, RouteTable
from .settings import Settings
from .upstream import Upstream


async def ready(request: web.Request) -> web.Response:
    """The upstream sets the gateway currently knows, their breakers, and how fresh each set is."""
    breakers = request.app[BREAKERS]
    watches = request.app[WATCHES]
    upstreams = {
        name: [{"id": i.id, "url": i.base_url, "breaker_open": breakers.is_open(i.id)} for i in watch.instances]
        for name, watch in watches.items()
    }
    now = asyncio.get_running_loop().time()
    # While Consul is away the sets are the last known ones: only this says so.
    discovery = {
        name: {
            "failures": watch.failures,
            "answered_seconds_ago": None if watch.answered_at is None else round(now - watch.answered_at, 1),
        }
        for name, watch in watches.items()
    }
    ok = all(upstreams.values())
    body = {"status": "ready" if ok else "degraded", "upstreams": upstreams, "discovery": discovery}
    return web.json_response(body)


async def forward(request: web.Request) -> web.StreamResponse:
    return await request.app[PROXY].handle(request)


@asynccontextmanager
async def proxy_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    # Give the watches a moment to learn the first healthy sets before we
    # register, so that a new gateway does not answer 503 for upstreams it
    # simply has not heard of. Bounded: without Consul, the registration
    # next waits for it up to 30 s more (consul.REGISTER_WAIT), then fails
    # the start, which is the visible outcome.
    await asyncio.gather(*(watch.wait_ready(5.0) for watch in app[WATCHES].values()))
    upstream = app[UPSTREAM]
    app[PROXY] = Proxy(
        app[ROUTE_TABLE],
        upstream,
        app[WATCHES],
        app[BREAKERS],
        expose_upstream=settings.expose_upstream,
    )
    app[RATE_LIMITER] = limiter = RateLimiter(
        settings.redis_url,
        Limits(per_ip=settings.rate_limit_ip, per_user=settings.rate_limit_user, auth_per_ip=settings.rate_limit_auth),
    )
    yield
    upstream.close()
    limiter.close()


def create_app(
    settings: Settings,
    *,
    routes: RouteTable = API,
    verifier: JwksVerifier | None = None,
    upstream: Upstream | None = None,
) -> web.Application:
    """The gateway app.

    ``routes`` is the published API; ``verifier`` replaces the JWKS fetched
    through Consul. Tests pass both, to put fake upstreams behind a real
    gateway, and ``upstream`` for a client with other limits (the app closes it).
    """
    guards = [] if settings.passthrough else [guard_middleware]
    # No service deadline: each route has its own (routes.Route.timeout).
    app = service_app(settings.service, middlewares=guards, client_max_size=settings.max_body, deadline=None)
    if not settings.passthrough:
        app.on_response_prepare.append(add_rate_limit_headers)
    app[SETTINGS] = settings
    app[ROUTE_TABLE] = routes.extended(settings.extra_routes)
    app[BREAKERS] = BreakerBoard(
        failure_threshold=settings.breaker_failures,
        recovery_timeout=settings.breaker_recovery,
        enabled=not settings.passthrough,
    )
    # Built here, connecting nothing: its pools are made on first use.
    if upstream is None:
        upstream = Upstream(limit_per_host=250, connect_timeout=settings.connect_timeout)
    app[UPSTREAM] = upstream
    contexts = [
        consul_ctx(settings.service),
        watch_services_ctx(*app[ROUTE_TABLE].services()),
        # The JWKS fetch goes through the proxy's breakers: one view of each
        # user-service instance, with the gateway's settings, shown by /ready.
        http_session_ctx(breakers=app[BREAKERS]),
    ]
    if verifier is None:
        contexts.append(jwks_ctx(issuer=settings.jwt_issuer, audience=settings.jwt_audience))
    else:
        app[VERIFIER] = verifier
    app.cleanup_ctx.extend([*contexts, proxy_ctx, registration_ctx()])
    app.router.add_get("/ready", ready, name="ready")
    app.router.add_route("*", "/{tail:.*}", forward, name="proxy")
    return app
