"""Run an app: bind first, then serve; on SIGTERM leave Consul, drain, stop.

The socket is bound before the app is built so that ``SERVICE_PORT=0`` works:
the kernel picks a free port, and that port is what the instance registers.
It listens only once the app has started, when its site starts (asyncio's
and uvloop's ``create_server(sock=...)`` call ``listen``). Until then a
connection is refused rather than left in a backlog through the start-up
(the discovery watches, migrations, registration): a proxy that found the
instance early, as Envoy does by Docker's DNS under compose, tries another
at once.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import socket

import structlog
from aiohttp import web

from .registration import REGISTRATION
from .requests import LEAVING

log = structlog.get_logger()
BACKLOG = 1024


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``, not yet listening: ``serve`` listens on it once the app has started."""
    # "::" is every interface, IPv4 included (Linux's default dual stack).
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # For a restart beside its predecessor's connections in TIME_WAIT. Linux
    # also lets another socket with it bind the port until one listens: the
    # other then fails in serve, at its listen, after its start-up.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def _listening(sock: socket.socket) -> bool:
    return sock.fileno() != -1 and bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


async def serve(app: web.Application, sock: socket.socket, *, drain_seconds: float = 0.5) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    runner = web.AppRunner(app, access_log=None, shutdown_timeout=10)
    try:
        if not await _start_unless_stopped(runner, stop):
            log.info("stopped_while_starting")
            return
        # Everything alive now (modules, the app, its pools and clients) lives as
        # long as the process. Frozen, it is left out of every later collection:
        # a full one scanned these ~60k objects in about 40 ms, a pause that
        # held every request in flight (68 ms once under load in the gateway).
        gc.collect()
        gc.freeze()
        host, port = sock.getsockname()[:2]
        site = web.SockSite(runner, sock, backlog=BACKLOG)
        refused: str | None = None
        try:
            await site.start()
        except OSError as exc:  # asyncio: another process listened on the port first
            refused = exc.strerror
        if refused is None and not _listening(sock):  # uvloop: the same, closed without a word
            refused = "another process listens on it"
        if refused is not None:
            registration = app.get(REGISTRATION)
            if registration is not None:
                await registration.disown()
            raise SystemExit(f"cannot listen on {host}:{port}: {refused}")
        log.info("serving", address=sock.getsockname())
        await stop.wait()

        # Leave the healthy set first, so that watchers stop sending us work,
        # then give in-flight requests (and requests already routed here) a
        # moment before the listener closes. Meanwhile every answer closes its
        # connection: a caller that still finds us (compose's DNS lists a
        # container until it exits) never has one closed under its next request.
        leaving = app.get(LEAVING)
        if leaving is not None:
            leaving.now = True
        registration = app.get(REGISTRATION)
        if registration is not None:
            await registration.deregister()
            await asyncio.sleep(drain_seconds)
    finally:
        # Also when the start-up failed: what had started (pools, a relay, a
        # registration) is closed in order, before the process exits.
        await runner.cleanup()
    log.info("stopped")


async def _start_unless_stopped(runner: web.AppRunner, stop: asyncio.Event) -> bool:
    """Start the app (True), or give up at a stop signal that comes first (False).

    A start can take long: the registration waits up to 30 s for an agent
    that is away. Held until it ended, a SIGTERM would outlast the stop grace
    period (compose's 20 s), and the SIGKILL after it would skip the cleanup:
    an entry possibly made in Consul would be left to its reaper. Cancelled,
    each cleanup context closes what it had opened, and ``runner.cleanup()``
    the ones that had finished.
    """
    starting = asyncio.ensure_future(runner.setup())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if not starting.done():
        starting.cancel()
        await asyncio.wait({starting})
        if starting.cancelled():
            return False
    # Started (then a stop already set ends the serving at once), or failed: raised here.
    starting.result()
    return True


def run(app: web.Application, sock: socket.socket, *, drain_seconds: float = 0.5) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is in every service's deps
        asyncio.run(serve(app, sock, drain_seconds=drain_seconds))
    else:
        uvloop.run(serve(app, sock, drain_seconds=drain_seconds))
