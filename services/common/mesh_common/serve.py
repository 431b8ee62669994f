"""Run an app: bind first, then serve; on SIGTERM leave Consul, drain, stop.

The socket is bound before the app is built so that ``SERVICE_PORT=0`` works:
the kernel picks a free port, and that port is what the instance registers.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import socket

import structlog
from aiohttp import web

from .consul import REGISTRATION

log = structlog.get_logger()


def bind_socket(host: str, port: int) -> socket.socket:
    # "::" is every interface, IPv4 included (Linux's default dual stack).
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve(app: web.Application, sock: socket.socket, *, drain_seconds: float = 0.5) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    runner = web.AppRunner(app, access_log=None, shutdown_timeout=10)
    try:
        await runner.setup()
        # Everything alive now (modules, the app, its pools and clients) lives as
        # long as the process. Frozen, it is left out of every later collection:
        # a full one scanned these ~60k objects in about 40 ms, a pause that
        # held every request in flight (68 ms once under load in the gateway).
        gc.collect()
        gc.freeze()
        site = web.SockSite(runner, sock)
        await site.start()
        log.info("serving", address=sock.getsockname())
        await stop.wait()

        # Leave the healthy set first, so that watchers stop sending us work,
        # then give in-flight requests (and requests already routed here) a
        # moment before the listener closes.
        registration = app.get(REGISTRATION)
        if registration is not None:
            await registration.deregister()
            await asyncio.sleep(drain_seconds)
    finally:
        # Also when the start-up failed: what had started (pools, a relay, a
        # registration) is closed in order, before the process exits.
        await runner.cleanup()
    log.info("stopped")


def run(app: web.Application, sock: socket.socket, *, drain_seconds: float = 0.5) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is in every service's deps
        asyncio.run(serve(app, sock, drain_seconds=drain_seconds))
    else:
        uvloop.run(serve(app, sock, drain_seconds=drain_seconds))
