"""A service's deadline for a whole request: an answer within it, or a 503.

Deadlines nest, each inside the next, so that the innermost failure is the
one reported (tests/config/test_timeouts.py keeps them in step)::

    Envoy's route > the gateway's route (5 s) > a service's request (4.5 s)
        > one database connect or statement (4 s, mesh_common.db)

A statement has its own timeout, but a request waits for a pooled
connection, runs several statements and may call another service. Without a
bound on the whole, a database answering each statement in a second ran a
request past the gateway's 5 s: the client got the gateway's bare 504, and
the service, which aiohttp does not stop when its caller hangs up, went on
to commit what the client had been told had failed.

At the deadline the handler is cancelled. An open transaction rolls back
(aiopg closes a connection whose statement is cancelled), and the client
gets 503 DEPENDENCY_UNAVAILABLE with ``Retry-After`` from the problem
middleware. A call to another service made for the request ends by
``call_deadline``, a little earlier, so that a courtesy lookup made after a
commit degrades instead of turning a change that happened into a 503.
"""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from .problems import Handler

REQUEST_DEADLINE = 4.5  # seconds
# What a call made for a request leaves of its deadline, to write the answer.
ANSWER_MARGIN = 0.25
# The event loop's time (loop.time()) at which the request is cut off.
DEADLINE = web.RequestKey("mesh.deadline", float)
log = structlog.get_logger()


def deadline_middleware(seconds: float) -> Middleware:
    @web.middleware
    async def deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
        request[DEADLINE] = asyncio.get_running_loop().time() + seconds
        try:
            async with asyncio.timeout_at(request[DEADLINE]) as scope:
                return await handler(request)
        except TimeoutError:
            # Only ours is named here; a statement's own timeout is a
            # TimeoutError too, and the problem middleware logs every one.
            if scope.expired():
                log.warning("request_deadline_passed", path=request.path, method=request.method, seconds=seconds)
            raise

    return deadline


def call_deadline(request: web.Request) -> float | None:
    """The loop time by which a call made for ``request`` must end, if it has a deadline."""
    end = request.get(DEADLINE)
    return None if end is None else end - ANSWER_MARGIN
