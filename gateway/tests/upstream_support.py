"""An upstream for the tests of the gateway's own upstream client (``test_upstream_*``).

- ``echo_server``: a well-behaved aiohttp server that answers with what it was
  sent, in chunks, large or slowly, and records the client port of every
  request, so that a test can tell which connection carried it.

Misbehaving upstreams are raw asyncio servers, in ``test_upstream_messages``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from pytest_aiohttp import AiohttpServer

from mesh_gateway.upstream import HIGH_WATER


async def echo_server(aiohttp_server: AiohttpServer, **kwargs: Any) -> tuple[int, list[tuple[str, int]]]:
    """An upstream that records the client port of every request it answers; its port, and those client ports."""
    peers: list[tuple[str, int]] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
        if request.path == "/chunked":
            response = web.StreamResponse()
            await response.prepare(request)
            for part in (b"one,", b"two,", b"three"):
                await response.write(part)
            await response.write_eof()
            return response
        if request.path == "/large":
            return web.Response(body=b"x" * (5 * HIGH_WATER))
        if request.path == "/slow":
            await asyncio.sleep(0.2)
        body = await request.read()
        return web.json_response({"method": request.method, "body": body.decode(), "a": request.headers.get("X-A")})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    server = await aiohttp_server(app, **kwargs)
    assert server.port is not None  # started
    return server.port, peers
