"""One Lua script, called over one pipelined Redis connection, without tasks.

The rate limiter sits on every request's path, and with redis-py each call
went through a task, a stream reader and a future: several turns of the
event loop, each as long as everything else the loop had to do. Under load
that added milliseconds to every request (decision 3 in docs/decisions).

Here a call is written to the socket at once, and its answer is parsed
(hiredis) and handed to the caller's callback straight from
``data_received``. Redis answers in order, so calls are pipelined and
matched to answers by position. Any failure (refused, reset, a deadline
missed) fails every call outstanding and drops the connection, since the
order of what is still to come can no longer be trusted; the next call
connects again.

It takes the same URLs as redis-py: ``redis://``, ``rediss://`` (TLS,
verified against the system's CAs or ``?ssl_ca_certs=<file>``; redis-py's
``ssl_cert_reqs`` and ``ssl_check_hostname`` are honoured as it honours
them) and ``unix://``. Any other scheme or option (a client certificate, a
socket timeout, a pool size) is refused when the gateway starts: ignored,
it would be found out on the first request, or never.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import hiredis
from redis.asyncio.connection import SSLConnection, parse_url

Reply = list[Any] | Exception
OnReply = Callable[[Reply], None]


class RedisScriptError(Exception):
    """Redis answered a call with an error, or could not be reached in time."""


def _bulk(data: str | int | bytes) -> bytes:
    # surrogateescape: aiohttp decodes header bytes that are not UTF-8 into
    # lone surrogates, and a key made from one must still go out (as the
    # bytes it came as), not raise here.
    raw = data if isinstance(data, bytes) else str(data).encode("utf-8", "surrogateescape")
    return b"$%d\r\n%s\r\n" % (len(raw), raw)


def _command(*parts: str | int | bytes) -> bytes:
    """One command in RESP: an array of bulk strings."""
    return b"*%d\r\n" % len(parts) + b"".join(_bulk(part) for part in parts)


# What a URL may say, each honoured here (connection_class is its scheme).
_OPTIONS = frozenset({"host", "port", "path", "db", "username", "password", "connection_class"})
_TLS_OPTIONS = frozenset({"ssl_ca_certs", "ssl_cert_reqs", "ssl_check_hostname"})
_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def _parse(url: str) -> tuple[dict[str, Any], ssl.SSLContext | None]:
    """The URL's options, and the TLS context it asks for, if any; ValueError for what is not honoured."""
    options = dict(parse_url(url))  # ValueError for an unknown scheme
    tls = options.get("connection_class") is SSLConnection
    if unknown := sorted(options.keys() - (_OPTIONS | _TLS_OPTIONS if tls else _OPTIONS)):
        # Named, never the URL itself: it may hold a password.
        raise ValueError(
            f"REDIS_URL: {', '.join(unknown)} not honoured by the gateway's rate limiter, which takes a user,"
            " a password and a database, and with rediss:// ssl_ca_certs, ssl_cert_reqs and ssl_check_hostname"
        )
    return options, _tls_context(options) if tls else None


def _tls_context(options: Mapping[str, Any]) -> ssl.SSLContext:
    # parse_url passes query arguments it does not type (ssl_ca_certs, ssl_cert_reqs) through.
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    reqs = options.get("ssl_cert_reqs", "required")
    if reqs not in _CERT_REQS:
        raise ValueError(f"REDIS_URL option ssl_cert_reqs must be none, optional or required, not {reqs!r}")
    context.check_hostname = False  # first: no verify_mode of CERT_NONE while it is on
    context.verify_mode = _CERT_REQS[reqs]
    # As in redis-py: on unless turned off, and never without a certificate to check.
    context.check_hostname = reqs != "none" and options.get("ssl_check_hostname") is not False
    return context


def _unnamed(reply: Reply) -> None:
    """Take CLIENT SETNAME's answer, and ignore it.

    A name makes the connection findable in CLIENT LIST, but a user the ACL
    denies CLIENT (or a hosted Redis that disables it) must still run the script.
    """


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: RedisScript) -> None:
        self._owner = owner
        self._reader = hiredis.Reader()

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            # An answer can reset the connection (a failed set-up command):
            # what is left of this read then belongs to no one still waiting.
            while self._owner._protocol is self and (reply := self._reader.gets()) is not False:
                self._owner._answered(reply)
        except hiredis.ProtocolError as exc:
            self._owner._reset(RedisScriptError(f"not Redis: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._lost(self, exc)


class RedisScript:
    """Calls one Lua script by its SHA1; ``call`` never blocks or awaits."""

    def __init__(self, url: str, script: str, *, timeout: float = 0.5, name: str = "todo-mesh-script") -> None:
        self._options, self._ssl = _parse(url)
        self._name = name
        self._script = script.encode()
        self._sha = hashlib.sha1(self._script).hexdigest().encode()
        self._timeout = timeout
        self._transport: asyncio.Transport | None = None
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._unsent: list[bytes] = []
        # Per command written, in order: (its arguments after the script's
        # name, for a retry; its callback; its deadline).
        self._waiting: deque[tuple[tuple[str | int, ...], OnReply | None, float]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def call(self, keys: Sequence[str], args: Sequence[str | int], on_reply: OnReply) -> None:
        """Run the script; ``on_reply`` gets its result, or an exception."""
        self._send((len(keys), *keys, *args), on_reply)

    def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._transport is not None:
            self._transport.close()
        self._fail(RedisScriptError("closed"))

    def _send(self, arguments: tuple[str | int, ...], on_reply: OnReply, *, retry_until: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        if retry_until is None:
            command = _command(b"EVALSHA", self._sha, *arguments)
        else:  # the script itself, for a Redis that has lost it
            command = _command(b"EVAL", self._script, *arguments)
        self._waiting.append((arguments, on_reply, retry_until or loop.time() + self._timeout))
        if self._timer is None:
            self._timer = loop.call_at(self._waiting[0][2], self._check_deadline)
        if self._transport is not None:
            self._transport.write(command)
            return
        self._unsent.append(command)
        if self._connecting is None:
            self._connecting = asyncio.create_task(self._connect())

    async def _connect(self) -> None:
        options = self._options
        failed: Exception | None = None
        try:
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(self._timeout):
                if "path" in options:
                    transport, protocol = await loop.create_unix_connection(lambda: _Protocol(self), options["path"])
                else:
                    host, port = options.get("host", "localhost"), options.get("port", 6379)
                    transport, protocol = await loop.create_connection(
                        lambda: _Protocol(self), host, port, ssl=self._ssl
                    )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            failed = RedisScriptError(f"cannot connect: {type(exc).__name__}")
        finally:
            self._connecting = None
        if failed is not None:
            # Only now: a caller told of the failure may call again at once,
            # and that call must start a connection of its own.
            self._fail(failed)
            return
        self._transport, self._protocol = transport, protocol
        # Set-up goes first on the wire, its answers checked like any other's:
        # a failure is fatal (None), but for the connection's name.
        setup: list[tuple[bytes, OnReply | None]] = []
        if options.get("password"):
            auth = [p for p in (options.get("username"), options["password"]) if p]
            setup.append((_command(b"AUTH", *auth), None))
        if options.get("db"):
            setup.append((_command(b"SELECT", options["db"]), None))
        setup.append((_command(b"CLIENT", b"SETNAME", self._name), _unnamed))
        setup.append((_command(b"SCRIPT", b"LOAD", self._script), None))
        deadline = asyncio.get_running_loop().time() + self._timeout
        for _, on_reply in reversed(setup):
            self._waiting.appendleft(((), on_reply, deadline))
        transport.write(b"".join([*(command for command, _ in setup), *self._unsent]))
        self._unsent.clear()

    def _answered(self, reply: Any) -> None:
        arguments, on_reply, deadline = self._waiting.popleft()
        if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT") and on_reply is not None:
            # Redis lost its scripts (flushed, or a failover): EVAL sends the
            # script itself and caches it again. Nothing ran, so nothing
            # is counted twice.
            self._send(arguments, on_reply, retry_until=deadline)
            return
        if isinstance(reply, hiredis.ReplyError):
            if on_reply is None:  # a set-up command failed: nothing after it can work
                self._reset(RedisScriptError(str(reply)))
                return
            on_reply(RedisScriptError(str(reply)))
            return
        if on_reply is not None:
            on_reply(reply)

    def _check_deadline(self) -> None:
        self._timer = None
        if not self._waiting:
            return
        oldest = self._waiting[0][2]
        loop = asyncio.get_running_loop()
        if oldest > loop.time():
            self._timer = loop.call_at(oldest, self._check_deadline)
            return
        self._reset(RedisScriptError("timed out"))

    def _lost(self, protocol: _Protocol, exc: Exception | None) -> None:
        if protocol is self._protocol:
            self._transport = self._protocol = None
            self._fail(RedisScriptError(f"connection lost: {type(exc).__name__ if exc else 'closed'}"))

    def _reset(self, error: Exception) -> None:
        if self._transport is not None:
            self._transport.abort()
        self._transport = self._protocol = None
        self._fail(error)

    def _fail(self, error: Exception) -> None:
        waiting, self._waiting = self._waiting, deque()
        self._unsent.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for _, on_reply, _ in waiting:
            if on_reply is not None:
                on_reply(error)
