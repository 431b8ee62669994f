"""Consul: one client per app, and self-registration with an HTTP check.

We use py-consul, the maintained fork of python-consul2 with the same
``consul.aio`` API (see docs/decisions/0001-py-consul.md).
"""

from __future__ import annotations

import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import consul
import consul.aio
import structlog
from aiohttp import web
from yarl import URL

from .app import CleanupCtx
from .health import SERVICE
from .settings import ServiceSettings

CONSUL = web.AppKey("mesh.consul", consul.aio.Consul)
log = structlog.get_logger()


def consul_client(url: str) -> consul.aio.Consul:
    parsed = URL(url)
    with warnings.catch_warnings():
        # py-consul 1.8 still passes aiohttp's deprecated verify_ssl/ssl_context
        # arguments; the warning is about its code, not ours.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="aiohttp")
        return consul.aio.Consul(host=parsed.host, port=parsed.port, scheme=parsed.scheme, verify=False)


def consul_ctx(url: str) -> CleanupCtx:
    """A cleanup context holding the app's one Consul client."""

    @asynccontextmanager
    async def open_consul(app: web.Application) -> AsyncIterator[None]:
        app[CONSUL] = client = consul_client(url)
        try:
            yield
        finally:
            await client.close()

    return open_consul


class Registration:
    """This instance's entry in Consul's catalog, with its health check."""

    def __init__(self, client: consul.aio.Consul, service: ServiceSettings, tags: list[str] | None = None) -> None:
        self._client = client
        self._service = service
        self._tags = tags or []
        self.registered = False

    @property
    def service_id(self) -> str:
        return self._service.instance_id

    async def register(self) -> None:
        s = self._service
        check = consul.Check.http(
            f"http://{s.advertise_address}:{s.port}/health",
            interval=s.check_interval,
            timeout="1s",
            deregister=s.deregister_after,
        )
        await self._client.agent.service.register(
            s.name,
            service_id=self.service_id,
            address=s.advertise_address,
            port=s.port,
            tags=self._tags,
            meta={"version": s.version},
            check=check,
        )
        self.registered = True
        log.info("consul_registered", service_id=self.service_id, address=s.advertise_address, port=s.port)

    async def deregister(self) -> None:
        # Idempotent: the shutdown path calls it before draining, and the
        # cleanup context calls it again in case shutdown went another way.
        if not self.registered:
            return
        self.registered = False
        try:
            await self._client.agent.service.deregister(self.service_id)
            log.info("consul_deregistered", service_id=self.service_id)
        except Exception as exc:  # Consul gone: its reaper removes us later
            log.warning("consul_deregister_failed", service_id=self.service_id, error=type(exc).__name__)


REGISTRATION = web.AppKey("mesh.registration", Registration)


def registration_ctx(tags: list[str] | None = None) -> CleanupCtx:
    """A cleanup context that registers the instance: add it **last**.

    Registering last means every dependency is ready before traffic arrives;
    cleanup runs in reverse, so the instance leaves Consul before anything
    it needs is closed.
    """

    @asynccontextmanager
    async def register_in_consul(app: web.Application) -> AsyncIterator[None]:
        app[REGISTRATION] = registration = Registration(app[CONSUL], app[SERVICE], tags)
        await registration.register()
        try:
            yield
        finally:
            await registration.deregister()

    return register_in_consul
