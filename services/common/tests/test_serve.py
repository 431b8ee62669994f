"""serve(): what every service process does between binding and exiting."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import aiohttp
import pytest
import uvloop
from aiohttp import web

from devstack.config import StackConfig
from mesh_common.app import service_app
from mesh_common.consul import consul_client, consul_ctx
from mesh_common.registration import Registration, registration_ctx
from mesh_common.requests import LEAVING
from mesh_common.serve import BACKLOG, bind_socket, serve
from mesh_common.testing import loopback_service


async def hello(request: web.Request) -> web.Response:
    return web.Response(text="hello")


async def answers(port: int) -> None:
    """Wait until a GET / on ``port`` answers hello."""
    # One connection per request, closed by the server as it answers:
    # none is left open at shutdown for the closing test loop to leak.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        for _ in range(100):  # bounded: 100 x 50 ms
            try:
                async with http.get(f"http://127.0.0.1:{port}/") as resp:
                    assert await resp.text() == "hello"
                    return
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)
    raise AssertionError("the server never answered")


async def test_serve_freezes_its_startup_objects_and_stops_on_sigterm() -> None:
    app = web.Application()
    app.router.add_get("/", hello)
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    gc.unfreeze()
    server = asyncio.create_task(serve(app, sock))
    try:
        await answers(port)
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


async def test_a_connection_during_the_start_up_is_refused_not_held() -> None:
    # Held in a backlog, it would wait out the start-up (discovery, migrations,
    # registration) and maybe a reset; refused, a proxy tries another instance.
    starting = asyncio.Event()
    go_on = asyncio.Event()

    async def slow_start(app: web.Application) -> AsyncIterator[None]:
        starting.set()
        await go_on.wait()
        yield

    app = web.Application()
    app.router.add_get("/", hello)
    app.cleanup_ctx.append(slow_start)
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = asyncio.create_task(serve(app, sock))
    try:
        await asyncio.wait_for(starting.wait(), timeout=10)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
        go_on.set()
        await answers(port)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(server, timeout=10)
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)
        gc.unfreeze()
        sock.close()


async def test_a_sigterm_during_the_start_up_stops_it_and_unwinds_what_had_started() -> None:
    # A start waits up to 30 s for a Consul agent that is away. Held until it
    # ended, the SIGTERM outlasted compose's 20 s grace, and the SIGKILL that
    # followed skipped every cleanup (a registration maybe made among them).
    events: list[str] = []
    waiting = asyncio.Event()

    async def opened(app: web.Application) -> AsyncIterator[None]:
        events.append("opened")
        yield
        events.append("closed")

    async def waits_for_consul(app: web.Application) -> AsyncIterator[None]:
        try:
            waiting.set()
            await asyncio.sleep(3600)  # an agent that never comes
            yield
        finally:
            events.append("gave up")

    app = web.Application()
    app.cleanup_ctx.extend([opened, waits_for_consul])
    sock = bind_socket("127.0.0.1", 0)
    server = asyncio.create_task(serve(app, sock))
    try:
        await asyncio.wait_for(waiting.wait(), timeout=10)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(server, timeout=10)
        assert events == ["opened", "gave up", "closed"]
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)
        sock.close()


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """One GET / on a kept-alive connection: the answer's head, lowered (the body is read too)."""
    writer.write(b"GET / HTTP/1.1\r\nHost: instance\r\n\r\n")
    async with asyncio.timeout(5):
        head = (await reader.readuntil(b"\r\n\r\n")).lower()
        assert await reader.readexactly(len("hello")) == b"hello"
    return head


async def test_a_leaving_instance_closes_each_connection_after_its_answer(infra: StackConfig) -> None:
    # Under compose, Envoy finds a leaving gateway by Docker's DNS until it
    # exits, and sends on its pooled connections through the drain. Closed
    # unannounced at the end, one could take a request as it closed: lost,
    # and unsafe to send again. Told with each answer, no caller reuses one.
    service = loopback_service(f"leaving-{uuid.uuid4().hex[:8]}", infra.consul_url)
    app = service_app(service)
    app.router.add_get("/", hello)
    app.cleanup_ctx.extend([consul_ctx(service), registration_ctx()])
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = asyncio.create_task(serve(app, sock, drain_seconds=2.0))
    writer: asyncio.StreamWriter | None = None
    try:
        await answers(port)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert b"connection: close" not in await exchange(reader, writer)

        os.kill(os.getpid(), signal.SIGTERM)
        async with asyncio.timeout(5):  # bounded: every 10 ms
            while not app[LEAVING].now:
                await asyncio.sleep(0.01)

        assert b"connection: close" in await exchange(reader, writer)
        # Closed after the answer, well within the 2 s drain: not by the
        # cleanup that closes whatever is left open after it.
        async with asyncio.timeout(0.5):
            assert await reader.read() == b""
        await asyncio.wait_for(server, timeout=15)
    finally:
        if writer is not None:
            writer.close()
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)
        gc.unfreeze()
        sock.close()


Run = Callable[[Coroutine[Any, Any, None]], None]


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_the_site_listens_on_the_bound_socket_under_either_loop(run: Run) -> None:
    # bind_socket leaves the listen to create_server(sock=...): asyncio's
    # and uvloop's both make it, with the backlog given.
    async def main() -> None:
        app = web.Application()
        app.router.add_get("/", hello)
        runner = web.AppRunner(app)
        await runner.setup()
        sock = bind_socket("127.0.0.1", 0)
        try:
            await web.SockSite(runner, sock, backlog=BACKLOG).start()
            await answers(sock.getsockname()[1])
        finally:
            await runner.cleanup()
            sock.close()

    run(main())


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_a_port_another_socket_listens_on_first_fails_the_start_by_name(run: Run) -> None:
    # Linux lets two sockets with SO_REUSEADDR bind one port while neither
    # listens; the second to listen fails (uvloop, without a word).
    first = bind_socket("127.0.0.1", 0)
    port = first.getsockname()[1]
    second = bind_socket("127.0.0.1", port)
    first.listen()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit, match=f"cannot listen on 127.0.0.1:{port}"):
            run(serve(web.Application(), second))
    finally:
        for sig, handler in handlers.items():  # as serve() found them
            signal.signal(sig, handler)
        gc.unfreeze()
        first.close()
        second.close()


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_a_start_that_fails_at_its_listen_leaves_the_listeners_entry_in_consul(run: Run, infra: StackConfig) -> None:
    # Two instances started at once on one fixed port: both bind, both
    # register the same id (address and port), and one listens first.
    first = bind_socket("127.0.0.1", 0)
    port = first.getsockname()[1]
    second = bind_socket("127.0.0.1", port)
    first.listen()
    service = loopback_service(f"twin-{uuid.uuid4().hex[:8]}", infra.consul_url, port=port)

    async def main() -> None:
        client = consul_client(infra.consul_url)
        listener = Registration(client, service)  # the instance on `first`
        await listener.register()
        try:
            app = service_app(service)
            app.cleanup_ctx.extend([consul_ctx(service), registration_ctx()])
            with pytest.raises(SystemExit, match=f"cannot listen on 127.0.0.1:{port}"):
                await serve(app, second)
            assert service.instance_id in await client.agent.services()  # still there, for the listener
        finally:
            await listener.deregister()
            await client.close()

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        run(main())
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        gc.unfreeze()
        first.close()
        second.close()
