"""An agent away, refusing or hanging as an instance starts or stops: the start waits or fails, the stop is bounded."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import consul
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from consul.exceptions import BadRequest
from structlog.testing import capture_logs

from mesh_common import registration as mesh_registration
from mesh_common.app import service_app
from mesh_common.consul import consul_client, consul_ctx
from mesh_common.registration import Registration, registration_ctx
from mesh_common.testing import HeldPort, eventually, loopback_service


class FakeAgent:
    """A Consul agent's register and deregister endpoints, answering as told, in order."""

    def __init__(self, register: list[int] | None = None, *, hang_deregister: bool = False) -> None:
        self.register_answers = register or []
        self.hang_deregister = hang_deregister
        self.registrations: list[str] = []
        self.deregistrations: list[str] = []
        # What a hanging answer waits for; set as the test ends, so that the
        # server stops with no handler still running.
        self.release = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_put("/v1/agent/service/register", self.register)
        self.app.router.add_put("/v1/agent/service/deregister/{id}", self.deregister)

    async def register(self, request: web.Request) -> web.Response:
        self.registrations.append((await request.json())["id"])
        status = self.register_answers.pop(0) if self.register_answers else 200
        if status == 0:  # registered, and the answer never comes
            await self.release.wait()
        if status >= 400:
            return web.Response(status=status, text="Permission denied" if status == 403 else "no")
        return web.json_response(True)

    async def deregister(self, request: web.Request) -> web.Response:
        self.deregistrations.append(request.match_info["id"])
        if self.hang_deregister:
            await self.release.wait()
        return web.json_response(True)


async def test_an_agent_not_up_yet_at_start_is_waited_for() -> None:
    # As under compose, where Consul may still be starting (or electing a
    # leader: a 500) when a service is ready to register.
    agent = FakeAgent(register=[500])
    with HeldPort() as held, capture_logs() as logs:  # bound, not listening: connections are refused
        client = consul_client(f"http://127.0.0.1:{held.port}")
        registration = Registration(client, loopback_service("patient", "unused", port=8125))
        server = TestServer(agent.app, port=held.port, socket_factory=held.socket_factory)
        try:
            starting = asyncio.create_task(registration.register())
            await eventually(lambda: any(e["event"] == "consul_register_retrying" for e in logs), within=10)
            await server.start_server()
            await asyncio.wait_for(starting, timeout=20)
        finally:
            await client.close()
            await server.close()
    assert registration.registered
    assert agent.registrations == [registration.service_id] * 2  # the 500, then the one that took
    assert [e["event"] for e in logs].count("consul_registered") == 1


async def test_an_agent_away_for_the_whole_wait_fails_the_start_naming_it() -> None:
    with HeldPort() as held, capture_logs() as logs:
        url = f"http://127.0.0.1:{held.port}"
        client = consul_client(url)
        registration = Registration(client, loopback_service("abandoned", "unused", port=8126))
        try:
            # Refused, at the last try: not a timeout (an OSError too), which would
            # mean a try hung on an agent that is plainly away.
            with pytest.raises(aiohttp.ClientConnectorError):
                await registration.register(within=2.0)
        finally:
            await client.close()
    retries = [e for e in logs if e["event"] == "consul_register_retrying"]
    [failed] = [e for e in logs if e["event"] == "consul_register_failed"]
    assert len(retries) >= 2
    assert failed["consul"] == url and failed["refused"] is False and failed["log_level"] == "error"
    # Connections refused: nothing can have reached an agent, nothing to deregister.
    assert not registration.registered


@pytest.mark.parametrize(("status", "error"), [(403, consul.ACLPermissionDenied), (400, BadRequest)])
async def test_an_agent_that_refuses_fails_the_start_at_once(aiohttp_server: Any, status: int, error: type) -> None:
    # A token it denies, or a definition it rejects: the same again next time.
    agent = FakeAgent(register=[status] * 5)
    client = consul_client(str((await aiohttp_server(agent.app)).make_url("/")))
    registration = Registration(client, loopback_service("refused", "unused", port=8127))
    try:
        with capture_logs() as logs, pytest.raises(error):
            await registration.register()
    finally:
        await client.close()
    assert len(agent.registrations) == 1
    [failed] = [e for e in logs if e["event"] == "consul_register_failed"]
    assert failed["refused"] is True
    assert failed["seconds"] < 5  # not the 30 s an agent that is away is waited for
    if status == 403:
        assert "Permission denied" in failed["error"]
    assert not registration.registered  # Consul said no: there is no entry


async def test_a_start_whose_registration_went_unanswered_deregisters(aiohttp_server: Any) -> None:
    # The agent registered the instance and its answer never came: the
    # entry would stay, checked and failing, until Consul reaped it.
    agent = FakeAgent(register=[0, 0, 0, 0, 0, 0, 0, 0])
    fake_consul = await aiohttp_server(agent.app)
    service = loopback_service("unanswered", str(fake_consul.make_url("/")), port=8128)
    app = service_app(service)
    app.cleanup_ctx.extend([consul_ctx(service), registration_ctx(wait_for_consul=0.5)])
    runner = web.AppRunner(app)
    try:
        with pytest.raises(TimeoutError):
            await runner.setup()
    finally:
        await runner.cleanup()
        agent.release.set()
    assert agent.registrations and agent.deregistrations == [service.instance_id]


async def test_a_hanging_agent_costs_a_stop_one_call_timeout_not_one_per_call(
    aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # serve() deregisters after SIGTERM, and the cleanup context again: two
    # full timeouts, with the drain and the workers' grace, would overrun
    # compose's stop_grace_period.
    # Long enough for the first call to reach the agent on a busy machine.
    monkeypatch.setattr(mesh_registration, "CALL_TIMEOUT", 1.0)
    agent = FakeAgent(hang_deregister=True)
    client = consul_client(str((await aiohttp_server(agent.app)).make_url("/")))
    registration = Registration(client, loopback_service("hung", "unused", port=8129))
    try:
        await registration.register()
        with capture_logs() as logs:
            await registration.deregister()  # as serve() does: times out
            await registration.deregister()  # as the cleanup does: nothing left to spend
    finally:
        agent.release.set()
        await client.close()
    assert agent.deregistrations == [registration.service_id]
    assert [e["event"] for e in logs] == ["consul_deregister_failed", "consul_deregister_skipped"]
    assert registration.registered  # not known to be gone: Consul's reaper will see to it
