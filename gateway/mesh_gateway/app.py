"""``create_app``: the gateway's factory. Sync, with no side effects."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from mesh_common.app import service_app
from mesh_common.consul import consul_ctx, registration_ctx
from mesh_common.discovery import WATCHES, watch_services_ctx
from mesh_common.http import HTTP_SESSION, http_session_ctx
from mesh_common.resilience import BreakerBoard, RetryBudget

from .keys import BREAKERS, PROXY, RETRY_BUDGET, SETTINGS
from .proxy import Proxy
from .routes import upstream_services
from .settings import Settings


async def ready(request: web.Request) -> web.Response:
    """The upstream sets the gateway currently knows, and their breakers."""
    breakers = request.app[BREAKERS]
    upstreams = {
        name: [{"id": i.id, "url": i.base_url, "breaker_open": breakers.is_open(i.id)} for i in watch.instances]
        for name, watch in request.app[WATCHES].items()
    }
    ok = all(upstreams.values())
    return web.json_response({"status": "ready" if ok else "degraded", "upstreams": upstreams}, status=200)


async def forward(request: web.Request) -> web.StreamResponse:
    return await request.app[PROXY].handle(request)


@asynccontextmanager
async def proxy_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    app[PROXY] = Proxy(
        app[HTTP_SESSION],
        app[WATCHES],
        app[BREAKERS],
        app[RETRY_BUDGET],
        connect_timeout=settings.connect_timeout,
        expose_upstream=settings.expose_upstream,
    )
    yield


def create_app(settings: Settings) -> web.Application:
    app = service_app(settings.service, client_max_size=settings.max_body)
    app[SETTINGS] = settings
    app[BREAKERS] = BreakerBoard(
        failure_threshold=settings.breaker_failures, recovery_timeout=settings.breaker_recovery
    )
    app[RETRY_BUDGET] = RetryBudget()
    app.cleanup_ctx.extend(
        [
            consul_ctx(settings.service.consul_url),
            watch_services_ctx(*upstream_services()),
            http_session_ctx(limit=1000, limit_per_host=250),
            proxy_ctx,
            registration_ctx(),
        ]
    )
    app.router.add_get("/ready", ready, name="ready")
    app.router.add_route("*", "/{tail:.*}", forward, name="proxy")
    return app
