"""serve(): what every service process does between binding and exiting."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from mesh_common.serve import bind_socket, serve


async def test_serve_freezes_its_startup_objects_and_stops_on_sigterm() -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/", hello)
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    gc.unfreeze()
    server = asyncio.create_task(serve(app, sock))
    try:
        # One connection per request, closed by the server as it answers:
        # none is left open at shutdown for the closing test loop to leak.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            for _ in range(100):  # bounded: 100 x 50 ms
                try:
                    async with http.get(f"http://127.0.0.1:{port}/") as resp:
                        assert await resp.text() == "hello"
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("the server never answered")
        # A later full collection leaves the app, its routes and every module
        # alone: they are frozen, not scanned again on each pass.
        assert gc.get_freeze_count() > 1000
        # serve() must have taken SIGTERM over; with the default handler the
        # kill below would end the whole test session instead of this server.
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(server, timeout=10)
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)  # its cleanup runs, even on failure
        gc.unfreeze()
        sock.close()


async def test_a_failed_start_unwinds_what_had_started_before_serve_returns() -> None:
    events = []

    async def opened(app: web.Application) -> AsyncIterator[None]:
        events.append("opened")
        yield
        events.append("closed")

    async def broken(app: web.Application) -> AsyncIterator[None]:
        # A generator, as cleanup_ctx wants, that fails before it yields (a
        # yield after the raise would be code mypy calls unreachable).
        for _ in ():
            yield
        raise ConnectionError("Consul is away")

    app = web.Application()
    app.cleanup_ctx.extend([opened, broken])
    sock = bind_socket("127.0.0.1", 0)
    try:
        try:
            await serve(app, sock)
        except ConnectionError:
            pass
        else:
            raise AssertionError("serve() started an app whose start-up failed")
        # In order, before serve() returned: not whenever the generator is
        # finalized, after asyncio.run has already cancelled what it closes.
        assert events == ["opened", "closed"]
    finally:
        sock.close()
