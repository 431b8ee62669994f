"""Self-registration: two checks, only one of which can get an instance reaped, and a keeper."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import ssl
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import consul.aio
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from devstack.config import StackConfig
from mesh_common import keeper
from mesh_common.app import service_app
from mesh_common.consul import CONSUL, consul_client, consul_ctx
from mesh_common.registration import REGISTRATION, Registration, registration_ctx
from mesh_common.testing import LeavesConsulFirst, eventually, loopback_service


async def poll(condition: Any, *, within: float = 10.0) -> None:
    async with asyncio.timeout(within):  # bounded: every 50 ms
        while not await condition():
            await asyncio.sleep(0.05)


async def test_only_the_liveness_check_can_get_an_instance_reaped(aiohttp_server: Any) -> None:
    # What reaches Consul, read off the wire: the agent does not report a
    # check's DeregisterCriticalServiceAfter back.
    registered: list[dict[str, Any]] = []

    async def register(request: web.Request) -> web.Response:
        registered.append(json.loads(await request.read()))
        return web.json_response(True)

    app = web.Application()
    app.router.add_put("/v1/agent/service/register", register)
    fake_consul = await aiohttp_server(app)
    client = consul_client(str(fake_consul.make_url("/")))
    try:
        service = loopback_service("reaped", "unused", port=8123)
        await Registration(client, service).register()
    finally:
        await client.close()

    [payload] = registered
    live, ready = payload["checks"]
    # Each check names its instance: another at the same address answers 404.
    assert live["http"] == f"http://127.0.0.1:8123/health/live?instance={service.instance_id}"
    assert live["DeregisterCriticalServiceAfter"] == service.deregister_after
    # A database outage fails readiness, for as long as it lasts, and must
    # never remove an instance that will be fine when it ends.
    assert ready["http"] == f"http://127.0.0.1:8123/health?instance={service.instance_id}"
    assert "DeregisterCriticalServiceAfter" not in ready


@pytest.mark.parametrize("token", ["from-the-settings", None])
async def test_the_acl_token_is_the_settings_never_the_environments(
    aiohttp_server: Any, aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch, token: str | None
) -> None:
    # py-consul takes $CONSUL_HTTP_TOKEN over the token it is given: the
    # settings, which read it in __main__, must be the one source.
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "from-the-environment")
    sent: dict[str, list[str | None]] = {}

    async def agent(request: web.Request) -> web.Response:
        sent.setdefault(request.method, []).append(request.headers.get("X-Consul-Token"))
        if request.method == "GET":  # the keeper's question: the entry, as it is
            return web.json_response({}, headers={"X-Consul-ContentHash": "same"})
        return web.json_response(True)

    fake = web.Application()
    fake.router.add_put("/v1/agent/service/{action:register|deregister/.*}", agent)
    fake.router.add_get("/v1/agent/service/{id}", agent)
    fake_consul = await aiohttp_server(fake)
    service = replace(loopback_service("tokened", str(fake_consul.make_url("/"))), consul_token=token)
    app = service_app(service)
    app.cleanup_ctx.extend([consul_ctx(service), registration_ctx()])
    client = await aiohttp_client(app)
    await eventually(lambda: "GET" in sent)  # the keeper's too
    await client.close()
    assert sent["PUT"] == [token, token]  # the registration and the deregistration
    assert set(sent["GET"]) == {token}


async def test_a_failed_deregistration_is_tried_again_by_the_next_call(aiohttp_server: Any) -> None:
    # The shutdown deregisters first; the cleanup calls again as a second
    # chance, which must not be a no-op when the first try failed.
    deregistrations: list[str] = []

    async def register(request: web.Request) -> web.Response:
        return web.json_response(True)

    async def deregister(request: web.Request) -> web.Response:
        deregistrations.append(request.match_info["id"])
        if len(deregistrations) == 1:
            return web.Response(status=500, text="agent busy")
        return web.json_response(True)

    app = web.Application()
    app.router.add_put("/v1/agent/service/register", register)
    app.router.add_put("/v1/agent/service/deregister/{id}", deregister)
    fake_consul = await aiohttp_server(app)
    client = consul_client(str(fake_consul.make_url("/")))
    try:
        registration = Registration(client, loopback_service("leaving", "unused", port=8124))
        await registration.register()
        await registration.deregister()
        assert registration.registered  # the agent still lists it
        await registration.deregister()
        await registration.deregister()  # done: nothing more is sent
    finally:
        await client.close()
    assert deregistrations == [registration.service_id] * 2
    assert not registration.registered


@dataclass
class Kept:
    """An instance registered with the test stack's agent, its keeper running; nothing listens on its port."""

    registration: Registration
    client: consul.aio.Consul

    async def known(self) -> bool:
        return self.registration.service_id in await self.client.agent.services()

    async def forget(self) -> None:
        """As an agent restarted with its state in memory does."""
        await self.client.agent.service.deregister(self.registration.service_id)


@pytest.fixture
async def kept(infra: StackConfig) -> AsyncIterator[Kept]:
    # Nothing listens on its port: its checks go critical, which changes nothing here.
    service = loopback_service(f"kept-{uuid.uuid4().hex[:8]}", infra.consul_url, port=9)
    client = consul_client(infra.consul_url)
    registration = Registration(client, service)
    try:
        await registration.register()
        registration.start_keeping()
        yield Kept(registration, client)
    finally:
        await registration.deregister()  # stops the keeper too
        await client.close()


async def test_a_lost_registration_comes_back_and_a_deregistered_one_does_not(kept: Kept) -> None:
    await kept.forget()
    await poll(kept.known)

    await kept.registration.deregister()  # on purpose, as at shutdown
    # Not registered again: the keeper asks whether the instance means to be
    # listed before it registers. One caught mid-registration is the next test's.
    with contextlib.suppress(TimeoutError):
        await poll(kept.known, within=0.5)
    assert not await kept.known()


async def test_a_registration_the_keeper_was_sending_never_follows_the_deregistration(infra: StackConfig) -> None:
    # The keeper heard the loss and is registering again as the instance
    # shuts down: deregister must stop it and wait, or its registration
    # reaches Consul after the deregistration, and a stopped instance stays
    # listed until its checks have been critical for a minute.
    client = consul_client(infra.consul_url)
    registration = Registration(client, loopback_service(f"kept-{uuid.uuid4().hex[:8]}", infra.consul_url, port=9))
    kept = Kept(registration, client)
    sending, go_on = asyncio.Event(), asyncio.Event()
    send = registration._register_once

    async def held(until: float | None = None) -> None:
        sending.set()
        await go_on.wait()
        await send(until)

    try:
        await registration.register()
        registration._register_once = held  # type: ignore[method-assign]
        registration.start_keeping()
        await kept.forget()
        async with asyncio.timeout(5):
            await sending.wait()

        await registration.deregister()
        go_on.set()

        with contextlib.suppress(TimeoutError):
            await poll(kept.known, within=0.5)
        assert not await kept.known()
    finally:
        go_on.set()
        await registration.deregister()
        await client.agent.service.deregister(registration.service_id)
        await client.close()


async def test_a_lost_registration_is_back_at_once_not_on_a_round(kept: Kept) -> None:
    # The keeper holds a query on the entry open: the agent answers it the
    # moment it forgets the instance. Every watch saw the instance gone
    # until the keeper's next round: up to 2 s, when it asked every 2 s.
    with capture_logs() as logs:
        for _ in range(3):  # the first as the keeper starts, the next while it waits on its query
            await kept.forget()
            await poll(kept.known, within=1.0)
    assert [e["event"] for e in logs].count("consul_registration_lost") == 3


@pytest.mark.parametrize(
    ("status", "gap"),
    [
        (200, keeper.AWAY_INTERVAL / 2),  # an agent that does not hold the query: it answers at once
        (500, keeper.AWAY_INTERVAL / 2),  # failing: asked four times a second, with jitter
        (403, 0.5),  # refusing: asked again after REFUSED_INTERVAL (shortened here)
    ],
)
async def test_an_agent_that_answers_at_once_is_not_asked_in_a_loop(
    aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch, status: int, gap: float
) -> None:
    monkeypatch.setattr(keeper, "REFUSED_INTERVAL", 0.5)
    asked: list[float] = []

    async def register(request: web.Request) -> web.Response:
        return web.json_response(True)

    async def entry(request: web.Request) -> web.Response:
        asked.append(asyncio.get_running_loop().time())
        return web.json_response({}, status=status, headers={"X-Consul-ContentHash": "same"})

    app = web.Application()
    app.router.add_put("/v1/agent/service/{action:register|deregister/.*}", register)
    app.router.add_get("/v1/agent/service/{id}", entry)
    client = consul_client(str((await aiohttp_server(app)).make_url("/")))
    registration = Registration(client, loopback_service("pressed", "unused", port=8131))
    try:
        await registration.register()
        registration.start_keeping()
        await eventually(lambda: len(asked) >= 4, within=5)
    finally:
        await registration.deregister()
        await client.close()
    assert min(b - a for a, b in itertools.pairwise(asked)) >= gap * 0.9


async def test_an_https_agent_has_its_certificate_verified() -> None:
    client = consul_client("https://consul.example.test:8501")
    try:
        connector = client.http._session.connector
        assert connector is not None
        context = connector._ssl  # what every connection to the agent is made with
        assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED
        assert context.check_hostname
    finally:
        await client.http._session.close()


@pytest.mark.parametrize("server_class", [LeavesConsulFirst, TestServer])
async def test_a_test_server_leaves_consul_before_it_stops_listening(infra: StackConfig, server_class: type) -> None:
    # As mesh_common.serve does. Until then Consul checks the instance, and a
    # check accepted while the listener closes is left open, to fail a later test.
    service = loopback_service(f"closing-{uuid.uuid4().hex[:8]}", infra.consul_url)
    app = service_app(service)
    app.cleanup_ctx.extend([consul_ctx(service), registration_ctx()])
    listed_when_listener_closed: list[bool] = []

    async def on_shutdown(app: web.Application) -> None:  # aiohttp runs it once the listener is closed
        listed_when_listener_closed.append(app[REGISTRATION].service_id in await app[CONSUL].agent.services())

    app.on_shutdown.append(on_shutdown)
    server = server_class(app)
    await server.start_server()
    await server.close()
    assert listed_when_listener_closed == [server_class is TestServer]


async def test_a_check_meant_for_another_instance_at_this_address_fails(aiohttp_client: Any) -> None:
    # A killed instance stays registered until reaped; whoever took its
    # address and port meanwhile must not keep its entry passing.
    service = loopback_service("todo-service", "unused", port=8080)
    client = await aiohttp_client(service_app(service))
    for path in ("/health/live", "/health"):
        async with client.get(path, params={"instance": "user-service-127.0.0.1-8080"}) as r:
            assert r.status == 404, path
        async with client.get(path, params={"instance": service.instance_id}) as r:
            assert r.status == 200, path
        async with client.get(path) as r:  # probes that name no instance (compose's, Envoy's)
            assert r.status == 200, path


@pytest.mark.parametrize(
    ("ready", "statuses"),
    [
        (None, [None, None]),  # starting, not listening yet: Consul's critical is the truth
        (True, ["passing", "passing"]),
        (False, ["passing", "critical"]),  # its database away: live, and out of every healthy set
    ],
)
async def test_an_instance_registered_while_it_serves_gives_its_checks_as_it_knows_them(
    aiohttp_server: Any, ready: bool | None, statuses: list[str | None]
) -> None:
    # Consul starts a check critical and first calls it up to an interval
    # later: registered again after a restarted agent forgot it, an instance
    # that serves would be out of every healthy set (and Consul's DNS) that long.
    registered: list[dict[str, Any]] = []

    async def register(request: web.Request) -> web.Response:
        registered.append(json.loads(await request.read()))
        return web.json_response(True)

    async def readiness() -> bool | None:
        return ready

    app = web.Application()
    app.router.add_put("/v1/agent/service/register", register)
    client = consul_client(str((await aiohttp_server(app)).make_url("/")))
    try:
        await Registration(client, loopback_service("known", "unused", port=8130), readiness=readiness).register()
    finally:
        await client.close()
    [payload] = registered
    assert [check.get("Status") for check in payload["checks"]] == statuses
