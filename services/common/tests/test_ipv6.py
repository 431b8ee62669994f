"""An instance on IPv6 (here ``::1``): bound, registered, checked by Consul, found and called.

Every piece once assumed IPv4: the socket's family, the checks' URLs and the
base URL callers use, where an IPv6 address needs brackets.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

import aiohttp
from aiohttp import web

from devstack.config import StackConfig
from mesh_common.app import service_app
from mesh_common.consul import consul_client
from mesh_common.discovery import Instance, ServiceWatch
from mesh_common.http import ServiceClient
from mesh_common.registration import Registration
from mesh_common.serve import bind_socket
from mesh_common.testing import eventually, loopback_service


def test_an_ipv6_instance_is_called_at_its_address_in_brackets() -> None:
    assert Instance("a", "::1", 8000).base_url == "http://[::1]:8000"
    assert Instance("b", "127.0.0.1", 8000).base_url == "http://127.0.0.1:8000"


async def test_an_instance_on_ipv6_passes_its_checks_and_is_called(infra: StackConfig) -> None:
    sock = bind_socket("::1", 0)
    port = sock.getsockname()[1]
    name = f"six-{uuid.uuid4().hex[:8]}"
    service = replace(loopback_service(name, infra.consul_url, port=port), host="::1", advertise_address="::1")

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"hello": "over IPv6"})

    app = service_app(service)
    app.router.add_get("/hello", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    client = consul_client(infra.consul_url)
    registration = Registration(client, service)
    watch = ServiceWatch(client, name, wait=1.0)
    try:
        await registration.register()
        watch.start()
        # Consul's own HTTP checks reach it: it turns passing, and is found.
        await eventually(lambda: len(watch.instances) == 1, within=15)
        (instance,) = watch.instances
        assert instance.address == "::1"
        async with aiohttp.ClientSession() as session:
            answer = await ServiceClient(session, {name: watch}).get_json(name, "/hello")
        assert answer == {"hello": "over IPv6"}
    finally:
        await watch.stop()
        await registration.deregister()
        await client.close()
        await runner.cleanup()
        await asyncio.sleep(0)
