"""Consul: one client per app (``consul_ctx``); registration.py registers the instance with it.

We use py-consul, the maintained fork of python-consul2 with the same
``consul.aio`` API (see docs/decisions/0001-py-consul.md).
"""

from __future__ import annotations

import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import consul
import consul.aio
from aiohttp import web
from yarl import URL

from .app import CleanupCtx
from .settings import ServiceSettings

CONSUL = web.AppKey("mesh.consul", consul.aio.Consul)


def consul_client(url: str, *, token: str | None = None) -> consul.aio.Consul:
    """A client of the agent at ``url``, whose every call carries ``token`` (None: none)."""
    parsed = URL(url)
    with warnings.catch_warnings():
        # py-consul 1.8 still passes aiohttp's deprecated verify_ssl/ssl_context
        # arguments; the warning is about its code, not ours.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="aiohttp")
        # Over https the agent's certificate is verified (against the system's
        # CAs); over plain http there is nothing to verify. Host, port, scheme
        # and verify given, py-consul reads none of them from the environment.
        https = parsed.scheme == "https"
        client = consul.aio.Consul(host=parsed.host, port=parsed.port, scheme=parsed.scheme, verify=https)
    # Not the token argument: py-consul prefers $CONSUL_HTTP_TOKEN to it, so
    # the environment would win over the settings, or add a token they lack.
    client.token = token
    return client


def consul_ctx(service: ServiceSettings) -> CleanupCtx:
    """A cleanup context holding the app's one Consul client, for the service's agent and token."""

    @asynccontextmanager
    async def open_consul(app: web.Application) -> AsyncIterator[None]:
        app[CONSUL] = client = consul_client(service.consul_url, token=service.consul_token)
        try:
            yield
        finally:
            await client.close()

    return open_consul
