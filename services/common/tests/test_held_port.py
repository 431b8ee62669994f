"""HeldPort: a test server's port, never free between being chosen and being listened on."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from mesh_common.testing import HeldPort


def binds(port: int) -> bool:
    # Without SO_REUSEADDR, with which Linux lets it share a port with a
    # socket that is bound and not listening yet: no sign of a free port.
    with socket.socket() as other:
        try:
            other.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def test_the_port_is_never_free_from_choice_to_server_and_comes_back_after_a_stop() -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    port = HeldPort()
    assert not binds(port.port)
    server = await asyncio.start_server(lambda r, w: w.close(), sock=port.take())
    assert server.sockets[0].getsockname()[1] == port.port
    server.close()
    await server.wait_closed()

    app = web.Application()
    app.router.add_get("/", hello)
    # As an outage test's server does: back on the same port once stopped.
    async with TestClient(TestServer(app, port=port.port, socket_factory=port.socket_factory)) as client:
        assert client.port == port.port
        async with client.get("/") as response:
            assert await response.text() == "hello"


def test_a_socket_no_server_took_is_closed_with_it() -> None:
    with HeldPort() as port:
        assert not binds(port.port)
    assert binds(port.port)


def test_a_server_asking_for_another_port_is_refused() -> None:
    with HeldPort() as port, pytest.raises(ValueError, match="asked for the socket"):
        port.socket_factory("127.0.0.1", 0, socket.AF_INET)
