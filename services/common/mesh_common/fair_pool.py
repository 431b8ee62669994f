"""aiopg's pool, its connections handed out in the order they were asked for.

aiopg's own pool is not fair. A released connection is handed on by a task
that runs in a later turn of the loop, and a request that asks in between
takes it first; the waiter it passed goes to the back of the queue again.
Above the pool's size most requests wait a few milliseconds and a few wait
for seconds: 32 clients of one todo-service (10 connections) saw a mean of
about 100 ms, 77 to 110 requests in 5 s over 100 ms, and a worst of 1.6 to 2.5 s
(by the service's log), past wrk's 2 s timeout. The pool's own timeout (the services'
STATEMENT_TIMEOUT, 4 s) would have failed such a request with a 503 while
the others were served in 15 ms.

So a request first queues for a turn, in an ``asyncio.Semaphore`` (first
come, first served) with one turn for each of the ``maxsize`` connections.
Whoever holds a turn finds a connection free, or room to open one, and no
newcomer can pass a waiter. The pool may open one connection more, for
``acquire_out_of_turn``: for what must not wait behind the queue. Decision 5
in docs/decisions has the measurements.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiopg


class FairPool(aiopg.Pool):
    """An ``aiopg.Pool`` whose ``acquire`` queues first come, first served."""

    def __init__(self, dsn: str, minsize: int, maxsize: int, timeout: float, **kwargs: Any) -> None:
        if maxsize < 1:  # aiopg's 0 is unbounded: there would be no turns to take
            raise ValueError("a FairPool needs a maxsize: it has as many turns as connections")
        # The one more is out of turn's alone: the turns never hold more than maxsize.
        super().__init__(dsn, minsize, maxsize + 1, timeout, **kwargs)
        self._turns = asyncio.Semaphore(maxsize)
        # The connections handed out on a turn, each to give it back. Kept
        # here, not read from aiopg's own lists: its release can raise once it
        # has taken a connection back (a ResourceWarning made an error).
        self._on_turns: set[aiopg.Connection] = set()

    async def _acquire(self) -> aiopg.Connection:
        # One deadline for the queue and the pool together: the pool's own.
        async with asyncio.timeout(self.timeout):
            await self._turns.acquire()
            try:
                conn = await super()._acquire()
            except BaseException:  # the deadline's cancellation too, mid-connect
                self._turns.release()
                raise
        self._on_turns.add(conn)
        return conn

    async def acquire_out_of_turn(self) -> aiopg.Connection:
        """A connection without queueing for a turn, for a request that has had one; ``release`` it.

        The check of a COMMIT whose answer was lost (mesh_common.transactions):
        its request's connection has just been closed and its turn handed on.
        At the back of the queue, when the database is slow and the queue
        long, the check would spend its time there and report the outcome
        unknown. Out of turn it takes the connection kept beyond the turns,
        at once; a second at the same time waits for it in aiopg's own queue.
        """
        return await super()._acquire()

    def release(self, conn: aiopg.Connection) -> asyncio.Future[None]:
        if conn in self._on_turns:
            self._on_turns.remove(conn)
            self._turns.release()
        return super().release(conn)


@asynccontextmanager
async def fair_pool(
    dsn: str,
    *,
    minsize: int,
    maxsize: int,
    timeout: float,  # noqa: ASYNC109 - aiopg's, for every call through the pool: not this one's
    on_connect: Callable[[aiopg.Connection], Awaitable[None]] | None = None,
) -> AsyncIterator[FairPool]:
    """A ``FairPool``, opened and closed as ``aiopg.create_pool`` does, with its defaults."""
    pool = await FairPool.from_pool_fill(
        dsn,
        minsize,
        maxsize,
        timeout,
        enable_json=True,
        enable_hstore=True,
        enable_uuid=True,
        echo=False,
        on_connect=on_connect,
        pool_recycle=-1.0,
    )
    assert isinstance(pool, FairPool)
    try:
        yield pool
    finally:
        pool.close()
        await pool.wait_closed()
