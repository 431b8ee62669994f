"""A real gateway in front of fake upstreams, discovered through a real Consul.

Upstream instances are small ``aiohttp_server`` apps whose behaviour each
test sets (answer, fail, hang). They are registered in the test Consul with
TTL checks, so a test can turn one critical exactly when it wants to.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from devstack.config import StackConfig
from mesh_common.testing import HeldPort, LeavesConsulFirst, TokenFactory, fresh_rate_window, loopback_service
from mesh_gateway.app import create_app
from mesh_gateway.routes import Route, RouteTable
from mesh_gateway.settings import Settings
from mesh_gateway.upstream import Upstream as UpstreamClient

GATEWAY_REDIS_DB = 3  # the gateway suite's own Redis database, flushed per test


HUGE = 8 * 1024 * 1024  # more than the kernel buffers between the gateway and a client hold


@dataclass
class Upstream:
    """One fake instance; ``mode`` is one of the branches of ``fake_service``'s handler ("ok" by default)."""

    service_id: str
    server: TestServer
    mode: str = "ok"
    hits: int = 0
    # Ends a "trickle" answer (which otherwise ends by itself after 5 s).
    stop_trickle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port


@dataclass
class FakeService:
    name: str
    instances: list[Upstream] = field(default_factory=list)

    @property
    def hits(self) -> int:
        return sum(i.hits for i in self.instances)


@pytest.fixture
async def consul(infra: StackConfig) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=infra.consul_url) as session:
        yield session


@pytest.fixture
def check_status(consul: aiohttp.ClientSession) -> Callable[[str, str], Awaitable[None]]:
    """Set a fake instance's TTL check to "passing" or "critical" in Consul."""

    async def set_status(service_id: str, status: str) -> None:
        verb = {"passing": "pass", "critical": "fail"}[status]
        async with consul.put(f"/v1/agent/check/{verb}/service:{service_id}") as r:
            assert r.status == 200, await r.text()

    return set_status


@pytest.fixture
async def fake_service(
    consul: aiohttp.ClientSession, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> AsyncIterator[Callable[[int], Awaitable[FakeService]]]:
    registered: list[str] = []

    async def make(count: int, *, address: str = "127.0.0.1") -> FakeService:
        service = FakeService(name=f"fake-{uuid.uuid4().hex[:8]}")
        for n in range(count):
            upstream = Upstream(service_id=f"{service.name}-{n}", server=None)  # type: ignore[arg-type]

            async def handle(request: web.Request, upstream: Upstream = upstream) -> web.StreamResponse:
                upstream.hits += 1
                if upstream.mode == "fail":
                    return web.json_response({"code": "BOOM"}, status=500, content_type="application/problem+json")
                if upstream.mode == "fail_plain":  # a 500 that is not a problem: a framework's default page
                    return web.Response(text="Internal Server Error: Traceback ...", status=500)
                if upstream.mode == "busy":  # alive, declining work for now: the user-service's TOO_BUSY
                    return web.json_response(
                        {"code": "TOO_BUSY"},
                        status=503,
                        content_type="application/problem+json",
                        headers={"Retry-After": "1"},
                    )
                if upstream.mode == "feature_down":  # well, but logins wait on its throttle's Redis
                    return web.json_response(
                        {"code": "FEATURE_UNAVAILABLE"},
                        status=503,
                        content_type="application/problem+json",
                        headers={"Retry-After": "5"},
                    )
                if upstream.mode == "dependency_down":  # its database away: a failure like any 5xx
                    return web.json_response(
                        {"code": "DEPENDENCY_UNAVAILABLE"},
                        status=503,
                        content_type="application/problem+json",
                        headers={"Retry-After": "1"},
                    )
                if upstream.mode == "client_error":  # the caller's fault, not the instance's
                    return web.json_response({"code": "CONFLICT"}, status=409, content_type="application/problem+json")
                if upstream.mode == "fail_huge":  # a 500 with a body no gateway should hold in memory
                    return web.Response(body=b"e" * HUGE, status=500)
                if upstream.mode == "hang":
                    await asyncio.sleep(5)
                if upstream.mode == "slow":  # healthy, but 0.4 s a request
                    await asyncio.sleep(0.4)
                if upstream.mode == "large":  # 1 MiB with its length: streamed, not buffered
                    return web.Response(body=b"y" * (1024 * 1024))
                if upstream.mode == "huge":
                    return web.Response(body=b"z" * HUGE)
                if upstream.mode == "trickle":  # a chunk every 20 ms, no length: a slow, healthy stream
                    response = web.StreamResponse()
                    await response.prepare(request)
                    # The gateway may hang up first: that is what some tests are about.
                    with contextlib.suppress(TimeoutError, ConnectionError):
                        async with asyncio.timeout(5):
                            while not upstream.stop_trickle.is_set():
                                await response.write(b"t" * 100)
                                await asyncio.sleep(0.02)
                        await response.write_eof()
                    return response
                if upstream.mode == "late_body":  # the head at once, the small body's end late: 0.5 s, then 3 s
                    response = web.StreamResponse(headers={"Content-Length": "2"})
                    await response.prepare(request)
                    with contextlib.suppress(ConnectionError):
                        await response.write(b"o")  # the head goes out with a body's first bytes
                        await asyncio.sleep(0.5 if upstream.hits == 1 else 3)
                        await response.write(b"k")
                    return response
                if upstream.mode == "hop_headers":  # names one of its own in Connection; ?size= bytes of body
                    hop = {"Connection": "keep-alive, X-Hop", "X-Hop": "1", "Keep-Alive": "timeout=5", "X-Kept": "3"}
                    return web.Response(body=b"h" * int(request.query["size"]), headers=hop)
                if upstream.mode == "truncate":  # promise 1 MiB, send a third, then drop the connection
                    response = web.StreamResponse(headers={"Content-Length": str(1024 * 1024)})
                    await response.prepare(request)
                    await response.write(b"x" * 350_000)
                    assert request.transport is not None
                    request.transport.close()
                    return response
                body = await request.read()
                response = web.json_response(
                    {
                        "instance": upstream.service_id,
                        "path": request.path,
                        "raw_query": request.rel_url.raw_query_string,
                        "body": body.decode(),
                        "request_id": request.headers.get("X-Request-ID"),
                        "forwarded_for": request.headers.get("X-Forwarded-For"),
                        "headers": dict(request.headers),
                    }
                )
                response.set_cookie("session", f"for-{request.headers.get('X-Request-ID')}")
                return response

            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", handle)
            upstream.server = await aiohttp_server(app)
            registration = {
                "Name": service.name,
                "ID": upstream.service_id,
                "Address": address,
                "Port": upstream.port,
                "Check": {"TTL": "60s", "Status": "passing", "DeregisterCriticalServiceAfter": "1m"},
            }
            async with consul.put("/v1/agent/service/register", json=registration) as r:
                assert r.status == 200, await r.text()
            registered.append(upstream.service_id)
            service.instances.append(upstream)
        return service

    yield make
    for service_id in registered:
        async with consul.put(f"/v1/agent/service/deregister/{service_id}"):
            pass


class ServedLikeProduction(LeavesConsulFirst):
    """A test server that, like ``mesh_common.serve``, lets a handler run on when its client hangs up.

    aiohttp's test server cancels it instead, which would hide what the
    gateway does when a write to a client that is gone fails.
    """

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        return web.AppRunner(self.app, **{**kwargs, "handler_cancellation": False})


@pytest.fixture
def tokens() -> TokenFactory:
    return TokenFactory()


@pytest.fixture
async def gateway(
    infra: StackConfig,
    tokens: TokenFactory,
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
) -> AsyncIterator[Callable[..., Awaitable[TestClient[web.Request, web.Application]]]]:
    """Start a real gateway whose route table points /api/v1/things at ``service``."""
    redis_url = f"redis://127.0.0.1:{infra.ports.redis}/{GATEWAY_REDIS_DB}"
    flusher = aioredis.from_url(redis_url)
    await flusher.flushdb()
    ports = contextlib.ExitStack()  # closes what a gateway that failed to start never took

    async def make(
        service: FakeService | str,
        *,
        route_timeout: float = 2.0,
        upstream: UpstreamClient | None = None,
        **overrides: Any,
    ) -> TestClient[web.Request, web.Application]:
        name = service if isinstance(service, str) else service.name
        if any(key.startswith("rate_limit") for key in overrides):
            await fresh_rate_window()  # a test of the limits expects exact counts
        # Known before the app is built: it registers in Consul as it starts, before it listens.
        held = ports.enter_context(HeldPort())
        settings = Settings(
            service=loopback_service("gateway", infra.consul_url, port=held.port),
            redis_url=redis_url,
            jwt_issuer=tokens.issuer,
            jwt_audience=tokens.audience,
            expose_upstream=True,
            # Limits out of the way, except in the tests about them.
            rate_limit_ip=10**9,
            rate_limit_user=10**9,
            rate_limit_auth=10**9,
        )
        settings = replace(settings, **overrides)
        table = RouteTable(
            routes=(
                Route(
                    "/api/v1/things",
                    name,
                    timeout=route_timeout,
                    idempotency_key_paths=frozenset({"/api/v1/things"}),
                ),
            ),
            public=frozenset(
                {("GET", "/api/v1/things/public"), ("POST", "/api/v1/things/login"), ("POST", "/api/v1/things/refresh")}
            ),
            auth=frozenset({("POST", "/api/v1/things/login")}),
            internal=("/api/v1/things/internal",),
            session=frozenset({("POST", "/api/v1/things/refresh")}),
        )
        app = create_app(settings, routes=table, verifier=tokens.verifier(), upstream=upstream)
        return await aiohttp_client(ServedLikeProduction(app, port=held.port, socket_factory=held.socket_factory))

    yield make
    ports.close()
    await flusher.aclose()


@dataclass
class SilentServer:
    """A TCP server that accepts connections and never sends a byte: a Redis stopped by SIGSTOP, or paused."""

    port: int = 0
    accepted: int = 0
    given_up: int = 0  # connections the client has closed


@pytest.fixture
async def silent_server() -> AsyncIterator[SilentServer]:
    silent = SilentServer()
    writers: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.accepted += 1
        writers.append(writer)
        with contextlib.suppress(ConnectionError):
            await reader.read()  # until the client gives up
        silent.given_up += 1

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    silent.port = server.sockets[0].getsockname()[1]
    yield silent
    server.close()
    for writer in writers:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    await server.wait_closed()


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamClient]:
    """The gateway's own upstream client alone, for the tests of it (``test_upstream_*``)."""
    client = UpstreamClient(limit_per_host=4, connect_timeout=0.5)
    yield client
    client.close()
