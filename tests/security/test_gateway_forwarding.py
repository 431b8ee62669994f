"""What a caller can claim about itself through X-Forwarded-* headers at the gateway.

X-Forwarded-For names the client only when the edge proxy (a trusted peer)
wrote its last entry; anyone reaching the gateway directly is limited by its
own address, whatever it forges. X-Forwarded-Host and -Proto are the
gateway's own, never the client's.
"""

from __future__ import annotations

import contextlib
import ipaddress
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpServer

from devstack.config import StackConfig
from mesh_common.settings import SettingsError
from mesh_common.testing import HeldPort, LeavesConsulFirst, TokenFactory, fresh_rate_window, loopback_service
from mesh_gateway.app import create_app
from mesh_gateway.routes import Route, RouteTable
from mesh_gateway.settings import LOOPBACK, Settings, networks

SECURITY_REDIS_DB = 5  # this suite's own Redis database, flushed per test
PUBLIC = "/api/v1/echo/public"
Gateway = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
async def echo(infra: StackConfig, aiohttp_server: AiohttpServer) -> AsyncIterator[str]:
    """A service, registered in Consul, that answers with the headers it got."""

    async def headers(request: web.Request) -> web.Response:
        return web.json_response(dict(request.headers))

    app = web.Application()
    app.router.add_get("/{tail:.*}", headers)
    server = await aiohttp_server(app)
    name = f"echo-{uuid.uuid4().hex[:8]}"
    registration = {
        "Name": name,
        "ID": name,
        "Address": "127.0.0.1",
        "Port": server.port,
        "Check": {"TTL": "60s", "Status": "passing", "DeregisterCriticalServiceAfter": "1m"},
    }
    async with aiohttp.ClientSession(base_url=infra.consul_url) as consul:
        async with consul.put("/v1/agent/service/register", json=registration) as r:
            assert r.status == 200, await r.text()
        yield name
        async with consul.put(f"/v1/agent/service/deregister/{name}"):
            pass


@pytest.fixture
async def gateway(
    infra: StackConfig, echo: str, aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]]
) -> AsyncIterator[Gateway]:
    redis_url = f"redis://127.0.0.1:{infra.ports.redis}/{SECURITY_REDIS_DB}"
    flusher = aioredis.from_url(redis_url)
    await flusher.flushdb()
    tokens = TokenFactory()
    ports = contextlib.ExitStack()  # closes what a gateway that failed to start never took

    async def make(**overrides: Any) -> TestClient[web.Request, web.Application]:
        if any(key.startswith("rate_limit") for key in overrides):
            await fresh_rate_window()  # a test of the limits expects exact counts
        # Known before the app is built: it registers in Consul as it starts, before it listens.
        held = ports.enter_context(HeldPort())
        settings = Settings(
            service=loopback_service("gateway", infra.consul_url, port=held.port),
            redis_url=redis_url,
            jwt_issuer=tokens.issuer,
            jwt_audience=tokens.audience,
            rate_limit_user=10**9,
            rate_limit_auth=10**9,
        )
        table = RouteTable(routes=(Route("/api/v1/echo", echo),), public=frozenset({("GET", PUBLIC)}), auth=frozenset())
        app = create_app(replace(settings, **overrides), routes=table, verifier=tokens.verifier())
        return await aiohttp_client(LeavesConsulFirst(app, port=held.port, socket_factory=held.socket_factory))

    yield make
    ports.close()
    await flusher.aclose()


async def statuses(client: TestClient[web.Request, web.Application], forged: list[str]) -> list[int]:
    result = []
    for address in forged:
        async with client.get(PUBLIC, headers={"X-Forwarded-For": address}) as r:
            result.append(r.status)
    return result


async def test_a_caller_that_is_not_the_edge_cannot_forge_its_way_past_the_ip_limit(gateway: Gateway) -> None:
    # The test client connects from 127.0.0.1: here, not a trusted proxy.
    client = await gateway(rate_limit_ip=3, trusted_proxies=(ipaddress.ip_network("192.0.2.0/24"),))

    forged = [f"198.51.100.{n}" for n in range(1, 6)]

    assert await statuses(client, forged) == [200, 200, 200, 429, 429]


async def test_behind_the_edge_the_last_forwarded_entry_is_the_client(gateway: Gateway) -> None:
    client = await gateway(rate_limit_ip=2, trusted_proxies=LOOPBACK)

    # The client's own first entries are ignored: the edge appended the last.
    first = await statuses(client, ["198.51.100.1", "203.0.113.7, 198.51.100.1", "198.51.100.1"])
    second = await statuses(client, ["198.51.100.2"])

    assert (first, second) == ([200, 200, 429], [200])


async def test_forwarded_host_and_proto_are_the_gateways_own(gateway: Gateway) -> None:
    client = await gateway()
    forged = {"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"}

    async with client.get(PUBLIC, headers=forged) as r:
        seen = await r.json()

    assert seen["X-Forwarded-Host"] == f"127.0.0.1:{client.port}"
    assert seen["X-Forwarded-Proto"] == "http"


def test_trusted_proxies_are_cidrs_read_from_the_environment() -> None:
    assert networks("10.1.0.0/16, 192.0.2.7") == (
        ipaddress.ip_network("10.1.0.0/16"),
        ipaddress.ip_network("192.0.2.7/32"),
    )
    assert networks("none") == ()
    for wrong in ("10.1.0.1/16", "envoy", "10.1.0.0/33"):
        with pytest.raises(SettingsError, match="GATEWAY_TRUSTED_PROXIES"):
            networks(wrong)
