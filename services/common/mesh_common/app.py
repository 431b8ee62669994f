"""The skeleton every service app shares: middlewares, limits, /health, background workers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from typing import Protocol

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from .deadlines import REQUEST_DEADLINE, deadline_middleware
from .health import setup_health
from .problems import Handler, problem_middleware
from .requests import LEAVING, Leaving, request_context_middleware
from .settings import ServiceSettings

DEFAULT_MAX_BODY = 64 * 1024
log = structlog.get_logger()

# What goes in ``app.cleanup_ctx``: set up on startup, torn down on cleanup.
CleanupCtx = Callable[[web.Application], AbstractAsyncContextManager[None]]


def service_app(
    service: ServiceSettings,
    *,
    middlewares: Iterable[Middleware] = (),
    client_max_size: int = DEFAULT_MAX_BODY,
    deadline: float | None = REQUEST_DEADLINE,
) -> web.Application:
    """A new app with request ids, problem+json errors, a deadline per request and health routes.

    ``client_max_size`` makes an oversized body a 413 before it is buffered.
    ``deadline`` (seconds) is None for the gateway, whose routes have their own.
    """
    leaving = Leaving()  # set by mesh_common.serve when the instance is told to stop
    first: list[Middleware] = [request_context_middleware(leaving), problem_middleware]
    if deadline is not None:
        first.append(deadline_middleware(deadline))
    app = web.Application(middlewares=[*first, *middlewares], client_max_size=client_max_size)
    app[LEAVING] = leaving
    setup_health(app, service)
    return app


class Worker(Protocol):
    async def run(self) -> None: ...

    def stop(self) -> None:
        """Make ``run`` return soon, after the unit of work in hand."""


def worker_ctx(name: str, make: Callable[[web.Application], Worker], *, grace: float = 5.0) -> CleanupCtx:
    """Run ``make(app).run()`` as a task for the app's lifetime.

    On shutdown the worker is told to stop and given ``grace`` seconds to
    finish the unit of work in hand: cancelled mid-batch, a relay would drop
    publishes the broker already has, and the next instance would send them
    again. So ``grace`` is the longest that unit may take: the relay's is
    derived from its batch's bound (``outbox_relay_ctx``), which the default
    would cut short. Then it is cancelled anyway: cancelling alone is not
    enough on Python 3.11, where a cancellation that arrives as a query or a
    confirm completes can be swallowed (``asyncio.wait_for``, used by aiopg),
    and the loop would go on forever.
    """

    @asynccontextmanager
    async def run_worker(app: web.Application) -> AsyncIterator[None]:
        worker = make(app)
        watch = WorkerEnd(name)
        task = asyncio.create_task(worker.run(), name=name)
        task.add_done_callback(watch)
        try:
            yield
        finally:
            watch.stopping = True
            worker.stop()
            await asyncio.wait({task}, timeout=grace)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    return run_worker


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait until ``event`` is set or ``seconds`` pass; whether it was set.

    ``threading.Event.wait(timeout)`` for asyncio: how a worker sleeps
    between rounds, so that a stop or a wake-up ends the sleep at once.
    """
    with suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    return event.is_set()


async def until_set(event: asyncio.Event, waiting: Awaitable[object], within: float | None = None) -> bool:
    """Wait for ``waiting`` until ``event`` is set or ``within`` seconds pass; whether it ended first.

    Its error, if it ended with one, is raised. Otherwise it is cancelled
    and not waited for: what it waits on (a broker that reads nothing,
    say) may not let even its cancellation end soon.
    """
    task = asyncio.ensure_future(waiting)
    setting = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, setting}, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()
        setting.cancel()
    if not task.done() or task.cancelled():
        return False
    task.result()
    return True


class WorkerEnd:
    """A background task's done callback: logs its end unless it was told to stop.

    Seen at once, not by the shutdown's gather: a worker gone early
    (crashed, returned, or cancelled by something else) is work silently
    not done until the process restarts.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.stopping = False

    def __call__(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            if not self.stopping:
                log.error("worker_ended", worker=self.name, reason="cancelled")
        elif (exc := task.exception()) is not None:
            log.error("worker_crashed", worker=self.name, error=repr(exc), exc_info=exc)
        elif not self.stopping:
            log.error("worker_ended", worker=self.name, reason="returned")


__all__ = [
    "DEFAULT_MAX_BODY",
    "CleanupCtx",
    "Handler",
    "Worker",
    "WorkerEnd",
    "service_app",
    "until_set",
    "wait_event",
    "worker_ctx",
]
