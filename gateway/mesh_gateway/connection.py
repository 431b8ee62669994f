"""One keep-alive HTTP/1.1 connection to an upstream (its pool is in ``pool.py``).

The wire side of ``upstream.py``: a ``Connection`` writes one request at a
time and parses the answer with httptools (llhttp, the parser Node.js and
uvicorn use).

* One request at a time per connection, never pipelined.
* Past ``HIGH_WATER`` of unread body the socket pauses, so a slow reader
  never makes the gateway buffer without bound.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools

if TYPE_CHECKING:
    from .pool import Pool

# Past this much unread body, reading from the upstream pauses.
HIGH_WATER = 1024 * 1024
# A response head (status line, headers, interim responses) past this size
# is broken: httptools would hold all of it, and one upstream could fill the
# gateway's memory. aiohttp's own client allows 8 KiB a line.
MAX_HEAD = 64 * 1024


class UpstreamConnectError(Exception):
    """No connection could be made: the request was never sent."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out  # the connect deadline passed, rather than a refusal


class UpstreamBroken(Exception):
    """The connection failed or the answer was not HTTP: the request may have been seen."""


class Connection(asyncio.Protocol):
    """One keep-alive connection, and the one response it is reading."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._parser = httptools.HttpResponseParser(self)
        # Made inside the loop's create_connection: its loop, asked once, not per request.
        self._loop = asyncio.get_running_loop()
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
        self._in_head = False
        self._until_close = False
        self._head_bytes = 0
        self._body_announced = False

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
            # A callback of ours that refused the response raised the reason.
            reason = exc.__context__
            self._fail(reason if isinstance(reason, UpstreamBroken) else UpstreamBroken(f"bad response: {exc}"))
            return
        if self._head is not None and not self._head.done():
            # Counted after parsing: a read that ends the head may carry a
            # large start of the body with it.
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:
                self._fail(UpstreamBroken(f"a response head over {MAX_HEAD} bytes"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._pool.discard(self)
        self.transport = None
        if self._until_close and exc is None and self._error is None:
            # Neither a length nor chunks: the body ends where the connection
            # does (HTTP/1.0 style), and httptools cannot be told of the end.
            self._complete = True
            self._wake()
        if not self._complete:
            self._fail(UpstreamBroken("the upstream closed the connection"))

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        if self._complete or self._head is None:
            # A second response to one request, or one to none at all:
            # whatever follows on this connection can no longer be matched
            # to a request. Raising stops the parser (data_received fails
            # the connection) before a byte of it joins an answer.
            raise UpstreamBroken("a response nobody asked for")
        self._in_head = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            # A chunked body's trailer fields: forwarded as headers, they would
            # appear or not depending on how the bytes happened to arrive.
            return
        try:
            # aiohttp writes header values as UTF-8 and nothing else: its C
            # writer drops what it cannot encode (bytes kept by surrogateescape),
            # its Python one raises. Bytes that are not UTF-8 cannot go on as
            # they came, and a value changed on the way is no answer to pass on.
            self.headers.append((name.decode(), value.decode()))
        except UnicodeDecodeError:
            raise UpstreamBroken(f"a header value that is not UTF-8: {name.decode(errors='replace')}") from None

    def on_headers_complete(self) -> None:
        self._in_head = False
        self.status = self._parser.get_status_code()
        if self.status == 101:
            # The rest is another protocol, and the gateway proxies no
            # upgrades. Refused here: else llhttp stops with HttpParserUpgrade,
            # no HttpParserError, and asyncio logs a crash.
            raise UpstreamBroken("101 Switching Protocols: the gateway proxies no upgrades")
        if self.status < 100:
            # llhttp takes any three digits. Skipped as interim, such an answer
            # would have the body it declared join the next one's.
            raise UpstreamBroken(f"a status below 100: {self.status:03d}")
        if self.status > 599:
            raise UpstreamBroken(f"a status above 599: {self.status}")
        if self.status < 200:
            # "100 Continue" and friends come before the real response: skip them.
            self._informational = True
            self.headers = []
            return
        framed = {name.lower() for name, _ in self.headers} & {"content-length", "transfer-encoding"}
        if "transfer-encoding" in framed:
            codings = [
                c.strip().lower() for n, v in self.headers if n.lower() == "transfer-encoding" for c in v.split(",")
            ]
            if codings != ["chunked"]:
                # Any other coding (gzip, or gzip then chunked) would still be
                # on the body once read, and Transfer-Encoding, hop-by-hop, does
                # not go on with it: the client would get gzip labelled as
                # plain. The gateway never offers one (TE stays behind); nginx
                # and HAProxy answer 502 too.
                raise UpstreamBroken(f"a transfer coding the gateway cannot pass on: {', '.join(codings)}")
        self._until_close = not framed and self.status not in (204, 304)
        if self.status == 204 and framed:
            # A 204 ends at its head (RFC 9112 6.3); one that announces a body
            # may send it once the connection is back in the pool, as the start
            # of the next answer. (A 304 may announce the body it does not send.)
            self._body_announced = any(
                n.lower() == "transfer-encoding" or v.strip() != "0" for n, v in self.headers if n.lower() in framed
            )
        if self._head is not None and not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self._informational:
            # An interim response ends at its head (RFC 9110, 15.2), but llhttp
            # reads the body a 1xx other than 100, 102 or 103 declares: kept,
            # it would join the real answer's.
            raise UpstreamBroken(f"an interim {self.status} response with a body")
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
        self._keep_alive = self._parser.should_keep_alive() and not self._body_announced
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

    async def exchange(self, head: bytes, body: bytes | None, deadline: float | None = None) -> None:
        """Send one request and wait for the response's head: ``TimeoutError`` once ``deadline`` passes."""
        if self.transport is None or self.transport.is_closing():
            # Closed before a byte of this request left: as good as never connected.
            raise UpstreamConnectError("the connection closed before the request was sent")
        self._reset()
        self._head = head_ = self._loop.create_future()
        self.transport.write(head + body if body else head)
        # A timer that fails the wait itself, not an asyncio.timeout: that
        # costs a cancellation's machinery (2.7 us against 1), on every request.
        timer = None if deadline is None else self._loop.call_at(deadline, self._late, head_)
        try:
            await head_
        finally:
            if timer is not None:
                timer.cancel()

    @staticmethod
    def _late(head: asyncio.Future[None]) -> None:
        if not head.done():
            head.set_exception(TimeoutError())

    def body_in_hand(self) -> list[bytes] | None:
        """The unread rest of the body if all of it is in, so that no wait is needed; else None."""
        return list(self._chunks) if self._complete else None

    async def next_chunk(self) -> bytes | None:
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._complete:
                return None
            self._wakeup = self._loop.create_future()
            await self._wakeup
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._paused and self._buffered <= HIGH_WATER // 4 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    def make_idle(self) -> None:
        """Ready for the pool: what was left unread dropped, and the socket read again.

        A response can be complete but not read to the end (its reader went
        away), its socket paused. Idle, the connection must read, to see the
        upstream close it, or send bytes nobody asked for, before it is reused.
        """
        self._chunks.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def keep_alive(self) -> bool:
        # An error is only ever recorded before completion, so this also means "no error".
        return self._complete and self._keep_alive
