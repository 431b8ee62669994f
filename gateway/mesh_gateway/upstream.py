"""The gateway's HTTP/1.1 client for upstreams: keep-alive, lean, streaming.

Why not ``aiohttp.ClientSession``: it is built for every use (cookies,
redirects, proxies, auth, tracing, decompression), and on the gateway's hot
path that generality cost more CPU than everything else the gateway does
(docs/gateway.md has the figures). A proxy needs one thing: send the
request it was given to a known address, and hand back status, headers and
body. So this client writes the request head itself and parses the answer
with httptools (llhttp, the parser Node.js and uvicorn use).

* Connections are kept alive per address, at most ``limit_per_host`` at a
  time; idle ones are closed after ``keepalive`` seconds, before an
  upstream would close them under us.
* One request at a time per connection, never pipelined. A connection goes
  back to the pool only once its response has been read to the end.
* The body comes whole (``read``) or in chunks (``iter_chunks``); a slow
  reader pauses the socket instead of buffering without bound.
* ``UpstreamConnectError`` means nothing was sent (safe to retry anywhere);
  ``UpstreamBroken`` means the upstream may have seen the request.
  Deadlines are the caller's, as ``asyncio.timeout``.

Request heads are built from what aiohttp's server parsed, which rejects
CR, LF and other control characters in the request line and headers, so
nothing a client sends can split the head.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import cast

import httptools
from multidict import CIMultiDict

# Past this much unread body, reading from the upstream pauses.
HIGH_WATER = 1024 * 1024


class UpstreamConnectError(Exception):
    """No connection could be made: the request was never sent."""


class UpstreamBroken(Exception):
    """The connection failed or the answer was not HTTP: the request may have been seen."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection, and the one response it is reading."""

    def __init__(self, pool: _Pool) -> None:
        self._pool = pool
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self._head: asyncio.Future[None] | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._wakeup: asyncio.Future[None] | None = None
        self._complete = False
        self._keep_alive = False
        self._error: Exception | None = None
        self._paused = False
        self._informational = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._head is None:
            # Bytes nobody asked for: this connection can no longer be trusted.
            self._fail(UpstreamBroken("unexpected data on an idle connection"))
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamBroken(f"bad response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._pool.discard(self)
        self.transport = None
        if not self._complete:
            self._fail(UpstreamBroken("the upstream closed the connection"))

    # -- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        # As aiohttp decodes them: bytes that are not UTF-8 survive the round trip.
        self.headers.append((name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        if self.status < 200:
            # "100 Continue" and friends come before the real response: skip them.
            self._informational = True
            self.headers = []
            return
        if self._head is not None and not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self._complete = True
        # Asked now: once this callback returns, llhttp resets for the next message.
        self._keep_alive = self._parser.should_keep_alive()
        self._wake()

    # -- used by Upstream and UpstreamResponse
    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _fail(self, error: Exception) -> None:
        if self._error is None and not self._complete:
            self._error = error
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
        self._wake()
        self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def exchange(self, head: bytes, body: bytes | None) -> None:
        """Send one request and wait for the response's head."""
        if self.transport is None or self.transport.is_closing():
            # Closed before a byte of this request left: as good as never connected.
            raise UpstreamConnectError("the connection closed before the request was sent")
        self._reset()
        self._head = asyncio.get_running_loop().create_future()
        self.transport.write(head + body if body else head)
        await self._head

    async def next_chunk(self) -> bytes | None:
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._complete:
                return None
            self._wakeup = asyncio.get_running_loop().create_future()
            await self._wakeup
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._paused and self._buffered <= HIGH_WATER // 4 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    def keep_alive(self) -> bool:
        # An error is only ever recorded before completion, so this also means "no error".
        return self._complete and self._keep_alive


class _Pool:
    """The connections to one address: idle ones, and a cap on how many are open."""

    def __init__(self, host: str, port: int, limit: int) -> None:
        self.host = host
        self.port = port
        self.idle: list[_Connection] = []
        self.slots = asyncio.Semaphore(limit)

    def discard(self, conn: _Connection) -> None:
        if conn in self.idle:
            self.idle.remove(conn)


class UpstreamResponse:
    """Status and headers as received; the body is read with ``read`` or ``iter_chunks``, once."""

    def __init__(self, pool: _Pool, conn: _Connection, *, head_only: bool) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self.status = conn.status
        self.headers = CIMultiDict(conn.headers)
        length = self.headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        if head_only:
            # A HEAD response ends at its head, whatever Content-Length says;
            # the parser cannot be told, so this connection is not reused.
            conn.close()
            self._done(reuse=False)

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.iter_chunks()])

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None:
            return
        try:
            while (chunk := await conn.next_chunk()) is not None:
                yield chunk
        finally:
            self._done(reuse=conn.keep_alive())

    def release(self) -> None:
        """Give the connection back, or close it if the body was not read to the end."""
        if self._conn is not None:
            self._done(reuse=self._conn.keep_alive())

    def _done(self, *, reuse: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if reuse and conn.transport is not None and not conn.transport.is_closing():
            conn.idle_since = time.monotonic()
            self._pool.idle.append(conn)
        else:
            conn.close()
        self._pool.slots.release()


class Upstream:
    """Keep-alive connections to every upstream address the gateway calls."""

    def __init__(self, *, limit_per_host: int = 250, connect_timeout: float = 0.5, keepalive: float = 30.0) -> None:
        self._limit = limit_per_host
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive
        self._pools: dict[tuple[str, int], _Pool] = {}

    async def request(
        self,
        method: str,
        host: str,
        port: int,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes | None = None,
    ) -> UpstreamResponse:
        """Send a request; return once the response's head has arrived.

        The caller must read the body or call ``release``: until then the
        connection is theirs.
        """
        pool = self._pools.get((host, port))
        if pool is None:
            pool = self._pools[(host, port)] = _Pool(host, port, self._limit)
        lines = [f"{method} {target} HTTP/1.1\r\nHost: {host}:{port}\r\n"]
        lines.extend(f"{name}: {value}\r\n" for name, value in headers)
        if body is not None or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body) if body else 0}\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("utf-8", "surrogateescape")

        await pool.slots.acquire()
        try:
            conn = await self._connection(pool)
            try:
                await conn.exchange(head, body)
            except BaseException:
                conn.close()
                raise
        except BaseException:
            pool.slots.release()
            raise
        return UpstreamResponse(pool, conn, head_only=method == "HEAD")

    async def _connection(self, pool: _Pool) -> _Connection:
        stale_before = time.monotonic() - self._keepalive
        while pool.idle:
            conn = pool.idle.pop()
            if conn.idle_since >= stale_before and conn.transport is not None and not conn.transport.is_closing():
                return conn
            conn.close()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, protocol = await loop.create_connection(lambda: _Connection(pool), pool.host, pool.port)
        except (OSError, TimeoutError) as exc:
            raise UpstreamConnectError(f"{pool.host}:{pool.port}: {exc or type(exc).__name__}") from None
        return protocol

    def close(self) -> None:
        for pool in self._pools.values():
            for conn in pool.idle:
                conn.close()
            pool.idle.clear()
        self._pools.clear()
