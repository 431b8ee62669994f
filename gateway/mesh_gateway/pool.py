"""The pool of keep-alive connections to one upstream address.

A ``Pool`` caps how many connections are open per address (callers beyond
the cap wait for a slot) and keeps the idle ones for reuse, newest first.
Idle connections are reused for at most ``keepalive`` seconds and closed
when that runs out, so that an upstream's own keep-alive timeout never
closes one under a request we are about to send.
"""

from __future__ import annotations

import asyncio

from .connection import Connection


class PoolTimeout(Exception):
    """No connection of our own pool came free in time: nothing was sent, and the upstream is not to blame."""


class QueuedTimeout(TimeoutError):
    """The deadline passed after the request was sent, but it had first waited for a connection of our own.

    The upstream may have seen the request. It had only what the wait left
    of the deadline, so the timeout does not say the instance is slow.
    """


class Pool:
    """The connections to one address: idle ones, and a cap on how many are open."""

    def __init__(self, host: str, port: int, limit: int, keepalive: float) -> None:
        self.host = host
        self.port = port
        self._slots = asyncio.Semaphore(limit)
        self._busy = 0  # connections lent out, or being opened, under a slot
        self._keepalive = keepalive
        self._loop = asyncio.get_running_loop()
        # Oldest first: connections are appended as they go idle.
        self._idle: list[Connection] = []
        self._closed = False
        # One timer per pool, not per connection: it fires when the oldest
        # idle connection expires, closes what has, and sets itself again.
        self._sweep: asyncio.TimerHandle | None = None

    @property
    def idle(self) -> list[Connection]:
        return self._idle

    @property
    def full(self) -> bool:
        return self._slots.locked()

    @property
    def unused(self) -> bool:
        """Nothing open, nothing lent out, nobody waiting: the pool can go."""
        # A slot handed to a waiter is off the semaphore's count before the
        # waiter runs and counts itself busy: then the semaphore is locked.
        return not self._busy and not self._idle and not self._slots.locked()

    async def acquire(self) -> None:
        """A slot: the right to use one connection, idle or new."""
        await self._slots.acquire()
        self._busy += 1

    def release(self) -> None:
        self._busy -= 1
        self._slots.release()

    def put_idle(self, conn: Connection) -> None:
        if self._closed:
            # A response released after the pool closed (a stream that
            # outlived the gateway's shutdown): nothing would close it here.
            conn.close()
            return
        conn.idle_since = self._loop.time()
        self._idle.append(conn)
        if self._sweep is None:
            self._sweep = self._loop.call_at(conn.idle_since + self._keepalive, self._close_expired)

    def take_idle(self) -> Connection | None:
        """The most recently used idle connection that can still be used, if any."""
        while self._idle:
            # The newest: its upstream is the least likely to have closed it.
            conn = self._idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                return conn
            conn.close()
        return None

    def _close_expired(self) -> None:
        self._sweep = None
        expired_before = self._loop.time() - self._keepalive
        while self._idle and self._idle[0].idle_since <= expired_before:
            self._idle.pop(0).close()
        if self._idle:
            self._sweep = self._loop.call_at(self._idle[0].idle_since + self._keepalive, self._close_expired)

    def discard(self, conn: Connection) -> None:
        if conn in self._idle:
            self._idle.remove(conn)

    def close(self) -> None:
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in self._idle:
            conn.close()
        self._idle.clear()
