"""The gateway's HTTP/1.1 client for upstreams: keep-alive, lean, streaming.

Why not ``aiohttp.ClientSession``: it is built for every use (cookies,
redirects, proxies, auth, tracing, decompression), and on the gateway's hot
path that generality cost more CPU than everything else the gateway does
(docs/measurements/gateway.md has the figures, and
docs/decisions/0002-gateway-upstream-client.md the choice). A proxy needs
one thing: send the request it was given to a known address, and hand back
status, headers and body. So this client writes the request head itself and
parses the answer with httptools (llhttp, the parser Node.js and uvicorn
use).

* Connections are kept alive per address, at most ``limit_per_host`` at a
  time; idle ones are closed once idle for ``keepalive`` seconds, before an
  upstream would close them under us (``connection.py``).
* One request at a time per connection, never pipelined. A connection goes
  back to the pool only once its response has been read to the end.
* The body comes whole (``read``) or in chunks (``iter_chunks``,
  ``next_chunk``); a slow reader pauses the socket instead of buffering
  without bound.
* ``UpstreamConnectError`` and ``PoolTimeout`` mean nothing was sent (safe
  to retry anywhere); ``UpstreamBroken`` and ``TimeoutError`` mean the
  upstream may have seen the request. A deadline given to ``request`` says
  which phase it ran out in; a caller's own ``asyncio.timeout`` cannot. A
  timeout after a wait for a free connection is a ``QueuedTimeout``: the
  upstream had only what the wait left, so it is not to blame; nor is it
  for a connect that the wait left less than ``connect_timeout`` for (a
  ``PoolTimeout``: nothing was sent).
* A ``BudgetHeader`` tells the upstream how long it has, measured as the
  request leaves; a wait for a connection that would leave it too little
  is given up (a ``PoolTimeout``). The response says how much of it was
  left as its head came back (``budget_left``).

Request heads are built from what aiohttp's server parsed, which rejects
CR, LF and other control characters in the request line and headers, so
nothing a client sends can split the head.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from multidict import CIMultiDict

from .connection import HIGH_WATER, Connection, UpstreamBroken, UpstreamConnectError
from .pool import Pool, PoolTimeout, QueuedTimeout

__all__ = [
    "HIGH_WATER",
    "BudgetHeader",
    "PoolTimeout",
    "QueuedTimeout",
    "Upstream",
    "UpstreamBroken",
    "UpstreamConnectError",
    "UpstreamResponse",
    "request_head",
]

# What a request needs left of its deadline, once it has waited for a free
# connection, for a timeout to say something about the upstream.
MIN_UPSTREAM_SECONDS = 0.1


@dataclass(frozen=True, slots=True)
class BudgetHeader:
    """The deadline, told to the upstream in header ``name`` as the milliseconds it has.

    Relative, since clocks differ; measured as the request leaves, after any
    wait for a connection and the connect; less ``margin``, kept for the
    answer's way back. After a wait for a connection, a request that would
    be told less than ``least`` is not sent: the upstream could do nothing
    useful in it.
    """

    name: str
    margin: float
    least: float


class UpstreamResponse:
    """Status and headers as received; the body is read once: ``read``, ``iter_chunks`` or ``next_chunk``."""

    def __init__(
        self, pool: Pool, conn: Connection, *, head_only: bool, queued: bool = False, budget_left: float = math.inf
    ) -> None:
        self._pool = pool
        self._conn: Connection | None = conn
        # Sent after a wait for a connection: the upstream had only what it left.
        self.queued = queued
        # Seconds of the budget it was told still to run as its head came back
        # (0 or less: it had run out); told none, it had no end. The upstream's
        # clock starts once the request is in, so nothing it cut by the budget
        # can come back while any is left.
        self.budget_left = budget_left
        self.status = conn.status
        self.headers = CIMultiDict(conn.headers)
        length = self.headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        if head_only:
            # A HEAD response ends at its head, whatever Content-Length says;
            # the parser cannot be told, so this connection is not reused.
            conn.close()
            self._done(reuse=False)

    async def read(self, limit: int | None = None, *, deadline: float | None = None) -> bytes:
        """The whole body; ``UpstreamBroken`` (and the connection closed) past ``limit`` bytes.

        ``TimeoutError`` once ``deadline`` (event-loop time) passes, with the
        body still coming; one already in whole is read without a timer.
        """
        # Most answers are in whole by the time their head is: no wait, no timer.
        in_hand = None if self._conn is None else self._conn.body_in_hand()
        if in_hand is not None:
            self._within(limit, sum(map(len, in_hand)))
            self.release()
            return b"".join(in_hand)
        async with asyncio.timeout_at(deadline):  # None: no end
            return await self._read(limit)

    async def _read(self, limit: int | None) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while (chunk := await self.next_chunk()) is not None:
            size += len(chunk)
            self._within(limit, size)
            chunks.append(chunk)
        return b"".join(chunks)

    def _within(self, limit: int | None, size: int) -> None:
        if limit is not None and size > limit:
            self._done(reuse=False)
            raise UpstreamBroken(f"a body over the {limit} bytes it may hold")

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        try:
            while (chunk := await self.next_chunk()) is not None:
                yield chunk
        finally:
            self.release()

    async def next_chunk(self) -> bytes | None:
        """The next piece of the body, or ``None`` at its end.

        For a caller that bounds each wait: a wait cut short (a timeout, a
        cancellation) closes the connection, whose response is half read.
        """
        conn = self._conn
        if conn is None:
            return None
        try:
            chunk = await conn.next_chunk()
        except BaseException:
            self._done(reuse=False)
            raise
        if chunk is None:
            self._done(reuse=conn.keep_alive())
        return chunk

    def release(self) -> None:
        """Give the connection back, or close it if the body was not read to the end."""
        if self._conn is not None:
            self._done(reuse=self._conn.keep_alive())

    def _done(self, *, reuse: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if reuse and conn.transport is not None and not conn.transport.is_closing():
            conn.make_idle()
            self._pool.put_idle(conn)
        else:
            conn.close()
        self._pool.release()


class Upstream:
    """Keep-alive connections to every upstream address the gateway calls."""

    def __init__(self, *, limit_per_host: int = 250, connect_timeout: float = 0.5, keepalive: float = 30.0) -> None:
        self._limit = limit_per_host
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive
        self._pools: dict[tuple[str, int], Pool] = {}

    async def request(
        self,
        method: str,
        host: str,
        port: int,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes | None = None,
        *,
        deadline: float | None = None,
        budget: BudgetHeader | None = None,
    ) -> UpstreamResponse:
        """Send a request; return once the response's head has arrived.

        ``deadline`` (event-loop time) bounds all of it, and what is raised
        when it passes tells how far the request got: ``PoolTimeout`` while
        waiting for a connection of our own, ``UpstreamConnectError`` while
        connecting (which gets at most ``connect_timeout`` of it): nothing
        was sent; ``TimeoutError`` while waiting for the head: it was.
        A request that waited for a free connection is sent only with
        ``MIN_UPSTREAM_SECONDS`` left, or a ``budget`` of its ``least``;
        a phase the wait cut short is not the upstream's doing:
        ``PoolTimeout`` for the wait or a connect left less than
        ``connect_timeout``, ``QueuedTimeout`` for the head. ``budget``
        needs a ``deadline``.

        The caller must read the body or call ``release``: until then the
        connection is theirs.
        """
        pool = self._pools.get((host, port))
        if pool is None:
            self._forget_unused()
            pool = self._pools[(host, port)] = Pool(host, port, self._limit, self._keepalive)
        head = request_head(method, host, port, target, headers, body)
        loop = asyncio.get_running_loop()

        queued = pool.full
        send_by = deadline
        if queued:
            if deadline is not None:
                # Sent later, the upstream could not answer (and its timeout would
                # count against an instance that was only busy), or could do
                # nothing useful in its budget: not worth a wait, nor a connect.
                send_by = deadline - MIN_UPSTREAM_SECONDS if budget is None else deadline - budget.margin - budget.least
            # Only a full pool waits (a free slot is taken without a pause),
            # so only this path pays for a timer.
            try:
                async with asyncio.timeout_at(send_by):
                    await pool.acquire()
            except TimeoutError:
                raise PoolTimeout(f"{host}:{port}: all {self._limit} connections stayed busy") from None
            if send_by is not None and loop.time() >= send_by:
                pool.release()  # handed over as the wait ran out: too late all the same
                raise PoolTimeout(f"{host}:{port}: a connection came free too late")
        else:
            await pool.acquire()
        try:
            conn = await self._connection(pool, send_by, queued=queued)
            budget_ends = math.inf
            if deadline is not None and budget is not None:
                sent = loop.time()
                told = max(0, int((deadline - budget.margin - sent) * 1000))
                head = head[:-2] + f"{budget.name}: {told}\r\n\r\n".encode()
                budget_ends = sent + told / 1000
            try:
                await conn.exchange(head, body, deadline)
            except BaseException as exc:
                conn.close()
                if queued and isinstance(exc, TimeoutError):
                    raise QueuedTimeout(f"{host}:{port}: late, after a wait for a connection") from None
                raise
        except BaseException:
            pool.release()
            raise
        left = budget_ends - loop.time()
        return UpstreamResponse(pool, conn, head_only=method == "HEAD", queued=queued, budget_left=left)

    async def _connection(self, pool: Pool, send_by: float | None, *, queued: bool) -> Connection:
        conn = pool.take_idle()
        if conn is not None:
            return conn
        loop = asyncio.get_running_loop()
        timeout = self._connect_timeout if send_by is None else min(self._connect_timeout, send_by - loop.time())
        try:
            async with asyncio.timeout(timeout):
                _, protocol = await loop.create_connection(lambda: Connection(pool), pool.host, pool.port)
        except TimeoutError:
            if queued and timeout < self._connect_timeout:
                # The slot came free without a connection to reuse (a HEAD's,
                # a cut stream's are closed), and the wait left the connect
                # less than its due: a busy instance slow to accept would be
                # blamed for our queue. Nothing was sent.
                raise PoolTimeout(f"{pool.host}:{pool.port}: a connection came free too late to connect") from None
            raise UpstreamConnectError(f"{pool.host}:{pool.port}: connect timed out", timed_out=True) from None
        except OSError as exc:
            raise UpstreamConnectError(f"{pool.host}:{pool.port}: {exc or type(exc).__name__}") from None
        return protocol

    def _forget_unused(self) -> None:
        # Instances come and go (a scale-down, a restart on a new port), and
        # a pool outlives its last connection: without this, one pool per
        # address ever seen. Swept when a new address appears, so the pools
        # kept are those of addresses used within a keep-alive.
        for address in [address for address, pool in self._pools.items() if pool.unused]:
            self._pools.pop(address).close()

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


def request_head(
    method: str, host: str, port: int, target: str, headers: Iterable[tuple[str, str]], body: bytes | None
) -> bytes:
    """The request line and headers; the body is sent after them as it is."""
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # an IPv6 address goes in brackets
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {authority}\r\n"]
    lines.extend(f"{name}: {value}\r\n" for name, value in headers)
    if body is not None or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body) if body else 0}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")
