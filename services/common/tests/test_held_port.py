"""HeldPort: a test server's port, never free between being chosen and being listened on."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from mesh_common.testing import HeldPort, port_binds, refuses_connections


async def hello(request: web.Request) -> web.Response:
    return web.Response(text="hello")


async def test_the_port_is_never_free_from_choice_to_server_and_comes_back_after_a_stop() -> None:
    with HeldPort() as held:
        assert not port_binds(held.port)
        server = await asyncio.start_server(lambda r, w: w.close(), sock=held.take())
        assert server.sockets[0].getsockname()[1] == held.port
        server.close()
        await server.wait_closed()

        app = web.Application()
        app.router.add_get("/", hello)
        # As an outage test's server does: back on the same port once stopped.
        async with TestClient(TestServer(app, port=held.port, socket_factory=held.socket_factory)) as client:
            assert client.port == held.port
            async with client.get("/") as response:
                assert await response.text() == "hello"


async def test_a_port_held_again_through_an_outage_refuses_connections_and_is_nobody_elses() -> None:
    with HeldPort() as held:
        server = await asyncio.start_server(lambda r, w: w.close(), sock=held.take())
        server.close()
        held.hold_again()
        await server.wait_closed()
        assert await refuses_connections(held.port)
        assert not port_binds(held.port)

        runner = web.AppRunner(web.Application())
        await runner.setup()
        try:
            await web.SockSite(runner, held.take()).start()  # the socket held through the outage
            assert not await refuses_connections(held.port)
        finally:
            await runner.cleanup()
        held.hold_again()
    assert port_binds(held.port)  # closed with it


async def test_a_port_is_held_again_beside_the_connections_its_server_closed() -> None:
    with HeldPort() as held:
        server = await asyncio.start_server(lambda r, w: w.close(), sock=held.take())
        reader, writer = await asyncio.open_connection("127.0.0.1", held.port)
        assert await reader.read() == b""  # the server hung up first: its end waits in TIME_WAIT
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        held.hold_again()
        assert await refuses_connections(held.port)


def test_holding_again_a_port_no_server_took_keeps_the_one_socket() -> None:
    with HeldPort() as held:
        held.hold_again()  # as the stop of a server never started does
    assert port_binds(held.port)


def test_a_socket_no_server_took_is_closed_with_it() -> None:
    with HeldPort() as held:
        assert not port_binds(held.port)
    assert port_binds(held.port)


def test_a_server_asking_for_another_port_is_refused() -> None:
    with HeldPort() as held, pytest.raises(ValueError, match="asked for the socket"):
        held.socket_factory("127.0.0.1", 0, socket.AF_INET)
