"""Test helpers every service's suite needs: signing keys and tokens, and a test server.

``TokenFactory`` signs access tokens the way the user-service does, and gives
a ``JwksVerifier`` that reads its public key set directly, so a service can
be tested without a running user-service. The real path (JWKS fetched
through Consul) is covered by the gateway and end-to-end suites.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import jwt
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..jwks import ACCESS_TOKEN_TYPE, JwksVerifier
from ..registration import REGISTRATION
from ..settings import ServiceSettings


class LeavesConsulFirst(TestServer):
    """A test server that stops as ``mesh_common.serve`` does: out of Consul before it stops listening.

    aiohttp's own closes its listener first and deregisters in the app's
    cleanup, after it; Consul's checks go on arriving in between. One accepted
    as the server shuts down is never served nor closed (Python 3.11's
    ``Server.close`` leaves accepted connections alone), and fails some later
    test as an unclosed socket.
    """

    async def close(self) -> None:
        registration = self.app.get(REGISTRATION) if self.app is not None else None
        if registration is not None:
            await registration.deregister()  # idempotent: the cleanup's call is then a no-op
        await super().close()


class TokenFactory:
    def __init__(self, *, issuer: str = "todo-mesh", audience: str = "todo-mesh-api") -> None:
        self.issuer = issuer
        self.audience = audience
        self.kid = uuid.uuid4().hex[:16]
        self.key = Ed25519PrivateKey.generate()

    def jwks(self) -> dict[str, Any]:
        jwk = jwt.algorithms.OKPAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        return {"keys": [{**jwk, "kid": self.kid, "alg": "EdDSA", "use": "sig"}]}

    def verifier(self) -> JwksVerifier:
        async def fetch() -> dict[str, Any]:
            return self.jwks()

        return JwksVerifier(fetch, issuer=self.issuer, audience=self.audience)

    def token(self, subject: str | None = None, *, ttl: int = 300, **claims: Any) -> str:
        now = int(time.time())
        payload = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": subject or str(uuid.uuid4()),
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "jti": uuid.uuid4().hex,
            **claims,
        }
        return jwt.encode(payload, self.key, algorithm="EdDSA", headers={"kid": self.kid, "typ": ACCESS_TOKEN_TYPE})

    def headers(self, subject: str | None = None, **claims: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(subject, **claims)}"}


async def eventually(condition: Callable[[], object], *, within: float = 5.0, interval: float = 0.005) -> None:
    """Poll ``condition`` until it holds, for at most ``within`` seconds."""
    async with asyncio.timeout(within):
        while not condition():
            await asyncio.sleep(interval)


async def run_module(module: str, *args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """``python -m module args...``, with ``env`` over ours: exit status, stdout, stderr (30 s at most)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, *args, env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await communicate_within(process, 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def communicate_within(process: asyncio.subprocess.Process, seconds: float) -> tuple[bytes, bytes]:
    """``process.communicate()``, bounded: on overrun the process is killed and reaped, then TimeoutError.

    Left running, it would outlive the test, and its transport, collected
    later, warns as unclosed in whatever test runs then.
    """
    try:
        async with asyncio.timeout(seconds):
            return await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise


def loopback_service(name: str, consul_url: str, *, port: int = 0) -> ServiceSettings:
    """Settings of a service instance under test, on loopback."""
    return ServiceSettings(
        name=name,
        version="test",
        host="127.0.0.1",
        port=port,
        advertise_address="127.0.0.1",
        consul_url=consul_url,
        log_format="console",
    )


async def fresh_rate_window(window: float = 60.0, margin: float = 5.0) -> None:
    """Wait until a fixed rate-limit window has ``margin`` seconds left (at most ``margin``).

    A burst that straddles a window's end is counted in two windows, and a
    test that expects an exact sequence of 200s and 429s fails about once in
    a few hundred runs, whenever the minute turns during it.
    """
    left = window - time.time() % window
    if left < margin:
        await asyncio.sleep(left + 0.05)


async def sleep_until_cancelled_by_the_server(cur: Any, pool: Any) -> None:
    """A long statement on ``cur``, which another session (from ``pool``) cancels once it runs."""
    await cur.execute("SELECT pg_backend_pid()")
    (pid,) = await cur.fetchone()

    async def cancel() -> None:
        async with pool.acquire() as conn, conn.cursor() as other:
            # Until the statement runs: a cancel that came before would be
            # lost on an idle session, and the statement run its 10 s.
            deadline = time.monotonic() + 5
            while True:
                await other.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,))
                if (await other.fetchone()) == ("active",):
                    break
                assert time.monotonic() < deadline, "the statement to cancel never ran"
                await asyncio.sleep(0.02)
            await other.execute("SELECT pg_cancel_backend(%s)", (pid,))

    canceller = asyncio.create_task(cancel())
    try:
        await cur.execute("SELECT pg_sleep(10)")
    finally:
        await canceller


_LOOPBACK = "127.0.0.1"


def _bind(port: int) -> socket.socket:
    sock = socket.socket()
    try:
        # On every bind, the first too: a listener's closed connections keep
        # its port in TIME_WAIT, and Linux binds the port again beside them
        # only if the new socket has SO_REUSEADDR and so did they (they have
        # the listener's options, set here when it was bound).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((_LOOPBACK, port))
    except OSError:
        sock.close()
        raise
    return sock


class HeldPort:
    """A loopback port bound at once, and held until the server meant for it listens on it.

    A port found free and let go (``free_port``) can be taken before its
    server binds it: by an outgoing connection, as its ephemeral port, or by
    another ``bind(0)``. This one's socket is handed to the server itself
    (``take`` for ``loop.create_server(sock=...)`` or ``web.SockSite``,
    ``socket_factory`` for aiohttp's test servers), and the kernel gives
    neither a port that is bound. What can still bind it is a socket asking
    for this very number with SO_REUSEADDR: Linux lets it share the port with
    the held socket, which is not listening, until one of the two listens.
    ``hold_again`` holds the port so again while its server is down.
    ``close`` lets go of a socket no server took: left to the garbage
    collector, it would fail some later test as unclosed.
    """

    def __init__(self) -> None:
        self._held: socket.socket | None = _bind(0)
        self.port: int = self._held.getsockname()[1]

    def take(self) -> socket.socket:
        """The socket to listen on, from then on the server's: its ``close`` closes it.

        The one held, if any (see ``hold_again``); else the port is bound anew,
        and something may have taken it since the server before let it go.
        """
        held, self._held = self._held, None
        return held if held is not None else _bind(self.port)

    def hold_again(self) -> None:
        """Bind the port again as the server on it stops, and hold it until ``take`` (or ``close``).

        For a server stopped on purpose and started again: through the
        outage the port is bound and not listening, so a connection to it is
        refused, as by a server that is down (and by ``refused_port``), and
        neither an outgoing connection nor a ``bind(0)`` can take it
        meanwhile (a socket asking for its number can: see the class). Call
        it right after the server closed its listening socket (Linux refuses
        to bind beside a listening one): the port is free only between the
        two. Holding a socket already (a server never started), it keeps that
        one.
        """
        if self._held is None:
            self._held = _bind(self.port)

    def socket_factory(self, host: str, port: int, family: socket.AddressFamily) -> socket.socket:
        """``take``, in the form aiohttp's ``BaseTestServer`` calls (give the server ``port=self.port`` too)."""
        if (host, port, family) != (_LOOPBACK, self.port, socket.AF_INET):
            raise ValueError(f"a server on {host}:{port} asked for the socket of {_LOOPBACK}:{self.port}")
        return self.take()

    def close(self) -> None:
        """Let go of the socket held, if any: one no server took, or one held again."""
        if self._held is not None:
            self._held.close()
            self._held = None

    def __enter__(self) -> HeldPort:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def free_port() -> int:
    """A loopback port free when asked, for a server another program starts and binds itself.

    It may be taken before that server binds it; a server of ours takes a
    ``HeldPort`` instead. For a port that must refuse connections, use
    ``refused_port``.
    """
    with socket.socket() as sock:
        sock.bind((_LOOPBACK, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections while the block runs.

    Bound and never listening: Linux answers a connection with a reset, and
    nothing else can take the port meanwhile, as it could one found free and
    let go (then a test of "refused" would reach whatever took it).
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def port_binds(port: int, *, reuse: bool = False) -> bool:
    """Whether another loopback socket could bind ``port`` now.

    Linux binds a socket with SO_REUSEADDR (``reuse``) beside one bound with
    it too, unless that one listens; one without it, beside none. So without
    ``reuse`` a held port, bound and not listening, shows as taken.
    """
    with socket.socket() as other:
        if reuse:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            other.bind((_LOOPBACK, port))
        except OSError:
            return False
        return True


async def refuses_connections(port: int) -> bool:
    """Whether a connection to ``port`` on loopback is refused, as to a server that is down."""
    try:
        _, writer = await asyncio.open_connection(_LOOPBACK, port)
    except ConnectionRefusedError:
        return True
    writer.close()
    await writer.wait_closed()
    return False
