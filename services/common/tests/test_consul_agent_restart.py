"""An agent restarted with its state in memory (``-dev``): each instance is back in the healthy sets at once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

from structlog.testing import capture_logs

from devstack.config import StackConfig
from mesh_common.app import service_app
from mesh_common.consul import consul_client, consul_ctx
from mesh_common.registration import registration_ctx
from mesh_common.testing import HeldPort, LeavesConsulFirst, eventually, loopback_service
from mesh_common.testing.proxy import TcpProxy


async def poll(condition: Callable[[], Awaitable[bool]], *, within: float) -> None:
    async with asyncio.timeout(within):  # bounded: every 50 ms
        while not await condition():
            await asyncio.sleep(0.05)


async def test_an_instance_is_back_passing_soon_after_a_restarted_agents_return(infra: StackConfig) -> None:
    # The shared agent must not restart: the instance reaches it through a
    # proxy, whose cut is the restart seen from the instance, and the agent
    # forgets the instance meanwhile, as a restarted -dev agent has. Until it
    # is back, every watch (the gateways') sees it gone, and natively Envoy
    # drops every gateway: the whole API was out for 2 to 4 s.
    proxy = TcpProxy(infra.ports.consul_http)
    agent = consul_client(infra.consul_url)
    name = f"restarted-{uuid.uuid4().hex[:8]}"

    async def passing() -> bool:
        _, entries = await agent.health.service(name, passing=True)
        return len(entries) == 1

    with HeldPort() as held:
        service = loopback_service(name, f"http://127.0.0.1:{proxy.port}", port=held.port)
        app = service_app(service)
        app.cleanup_ctx.extend([consul_ctx(service), registration_ctx()])
        server = LeavesConsulFirst(app, port=held.port, socket_factory=held.socket_factory)
        try:
            await proxy.start()
            await server.start_server()
            await poll(passing, within=10)  # Consul's own checks: its first is up to an interval away

            with capture_logs() as logs:
                await proxy.cut()
                await agent.agent.service.deregister(service.instance_id)
                # The keeper has found the agent away before it is back: at once, its
                # query held open dropped with the connection (it took up to 2 s).
                await eventually(lambda: any(e["event"] == "consul_keep_failed" for e in logs), within=1)
            await proxy.start()
            # About 0.4 s on a quiet machine (a question within 0.375 s, then
            # the registration); 1.5 leaves a busy one room, and is still
            # short of the 2 to 4 s this took before.
            await poll(passing, within=1.5)
        finally:
            await server.close()  # deregisters, through the proxy: before it closes
            await proxy.close()
            await agent.close()
