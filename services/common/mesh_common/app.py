"""The skeleton every service app shares: middlewares, limits and /health."""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import web

from .health import setup_health
from .problems import Handler, problem_middleware
from .requests import request_context_middleware
from .settings import ServiceSettings

DEFAULT_MAX_BODY = 64 * 1024


def service_app(
    service: ServiceSettings,
    *,
    middlewares: Iterable[web.middleware] = (),
    client_max_size: int = DEFAULT_MAX_BODY,
) -> web.Application:
    """A new app with request ids, problem+json errors and health routes.

    ``client_max_size`` makes an oversized body a 413 before it is buffered.
    """
    app = web.Application(
        middlewares=[request_context_middleware, problem_middleware, *middlewares],
        client_max_size=client_max_size,
    )
    setup_health(app, service)
    return app


__all__ = ["DEFAULT_MAX_BODY", "Handler", "service_app"]
