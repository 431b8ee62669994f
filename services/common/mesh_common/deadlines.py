"""A service's deadline for a whole request: an answer within it, or a 503.

Deadlines nest, each inside the next, so that the innermost failure is the
one reported (tests/config/test_timeouts.py keeps them in step)::

    Envoy's route > the gateway's route (5 s) > a service's request (4.5 s,
        or less if its caller has less) > one database connect or
        statement (4 s, mesh_common.db)

A statement has its own timeout, but a request waits for a pooled
connection, runs several statements and may call another service. Without a
bound on the whole, a database answering each statement in a second ran a
request past the gateway's 5 s: the client got the gateway's bare 504, and
the service, which aiohttp does not stop when its caller hangs up, went on
to commit what the client had been told had failed.

At the deadline the handler is cancelled. An open transaction rolls back
(aiopg closes a connection whose statement is cancelled), and the client
gets 503 DEPENDENCY_UNAVAILABLE with ``Retry-After`` from the problem
middleware. A COMMIT is the exception (``before_commit``): once begun, it
is let finish, and what follows it is no longer cut. A call to another
service made for the request ends by ``call_deadline``, a little earlier
than the request: a courtesy lookup made after a commit still ends in time,
and degrades.

A service's clock starts when this middleware runs, the gateway's before it
had a connection: a request that waited for one of the gateway's
connections, or for a busy service's loop, was given up by the gateway
first (a 504, not retried for a POST) while the service went on and
committed. So the gateway says how long it will wait, in ``BUDGET_HEADER``:
milliseconds, relative since clocks differ, less what the answer needs to
come back. The request's deadline is the sooner of the service's own and
that; below ``MIN_BUDGET`` it is ``MIN_BUDGET`` (the gateway sends nothing
with less), and a value that is not a count of milliseconds is ignored.
The gateway sets it itself, whatever a client sent: a direct caller can
only shorten its own request. What the budget cannot cover (a COMMIT let
finish that outlasts the gateway's margin) the gateway's 504 calls an
unknown outcome (docs/gateway.md, "Timeouts, in layers").
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from typing import TYPE_CHECKING

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

if TYPE_CHECKING:  # problems imports transactions, which imports this
    from .problems import Handler

REQUEST_DEADLINE = 4.5  # seconds
# What a call made for a request leaves of its deadline, to write the answer.
ANSWER_MARGIN = 0.25
# Less than this left, a request's transaction rolls back rather than commit.
COMMIT_MARGIN = 0.25
# What a caller says it will wait for the answer: milliseconds, from now.
BUDGET_HEADER = "X-Request-Deadline-Ms"
# The least a caller's budget shortens a request to: a few statements and a COMMIT.
MIN_BUDGET = 0.5
# Nine digits, 11 days: more says nothing a service's own deadline does not
# (and int() refuses over 4300 digits).
_MAX_BUDGET_DIGITS = 9
# The event loop's time (loop.time()) at which the request is cut off.
DEADLINE = web.RequestKey("mesh.deadline", float)
# The running request's cut-off, for ``before_commit``, deep in a repository.
_SCOPE: ContextVar[asyncio.Timeout | None] = ContextVar("mesh.request_deadline", default=None)
log = structlog.get_logger()


def deadline_middleware(seconds: float) -> Middleware:
    @web.middleware
    async def deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
        budget = caller_budget(request.headers.get(BUDGET_HEADER))
        allowed = seconds if budget is None else min(seconds, budget)
        request[DEADLINE] = asyncio.get_running_loop().time() + allowed
        try:
            async with asyncio.timeout_at(request[DEADLINE]) as scope:
                token = _SCOPE.set(scope)
                try:
                    return await handler(request)
                finally:
                    _SCOPE.reset(token)
        except TimeoutError:
            # Only ours is named here; a statement's own timeout is a
            # TimeoutError too, and the problem middleware logs every one.
            if scope.expired():
                log.warning("request_deadline_passed", path=request.path, method=request.method, seconds=allowed)
            raise

    return deadline


def caller_budget(value: str | None) -> float | None:
    """Seconds from a ``BUDGET_HEADER`` value, at least ``MIN_BUDGET``; None if it is not a count of milliseconds."""
    # isascii: str.isdigit takes other scripts' digits, and superscripts.
    if value is None or not (value.isascii() and value.isdigit()) or len(value) > _MAX_BUDGET_DIGITS:
        return None
    return max(MIN_BUDGET, int(value) / 1000)


def before_commit() -> None:
    """From a request's COMMIT on, its deadline cuts nothing; too late for one, a TimeoutError.

    Cut during COMMIT, the change may well be made (the server finishes a
    COMMIT it has received) while the client is told 503, retry: a retried
    refresh would count as a reuse and end the session, a retried create
    make a second todo. So a COMMIT begins only with time left for it, and
    is then let finish, bounded by its own statement timeout. Too late, the
    transaction rolls back and the 503 is true.
    """
    scope = _SCOPE.get()
    if scope is None or (when := scope.when()) is None:
        return
    if when - asyncio.get_running_loop().time() < COMMIT_MARGIN:
        raise TimeoutError("too little of the request's deadline is left to commit")
    scope.reschedule(None)


def call_deadline(request: web.Request) -> float | None:
    """The loop time by which a call made for ``request`` must end, if it has a deadline."""
    end = request.get(DEADLINE)
    return None if end is None else end - ANSWER_MARGIN
