"""``SmtpSink``: a real SMTP server (aiosmtpd) on a loopback port, for the notification-service's tests.

It keeps what it receives with its arrival time, can refuse senders,
recipients or messages, answer DATA late, leave the DATA command or RSET
unanswered or hang up at DATA, and be stopped and started again on its port,
which it holds, refusing connections, while stopped (``close`` lets it go).

As a relay, it can want a login (AUTH PLAIN and LOGIN, and MAIL refused
until then), and speak TLS with a certificate of the test's (see
``tls_certs``): offered with STARTTLS, or from the first byte (SMTPS).
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import functools
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session, syntax
from notification_support import eventually

from mesh_common.testing import HeldPort


@dataclass
class Received:
    raw: bytes
    recipients: list[str]
    at: float  # time.time() when the end of DATA arrived

    @functools.cached_property
    def message(self) -> EmailMessage:
        # Parsed when asked for, not on arrival: the bench times arrivals,
        # and parsing is the costliest thing a sink does.
        return email.message_from_bytes(self.raw, policy=email.policy.default)


@dataclass(frozen=True)
class Login:
    username: str
    password: str
    tls: bool  # whether it came over TLS


@dataclass
class SmtpSink:
    received: list[Received] = field(default_factory=list)
    refuse: dict[str, str] = field(default_factory=dict)  # address -> SMTP reply
    attempts: list[str] = field(default_factory=list)  # every RCPT TO, accepted or not
    refuse_sender: str | None = None  # the answer to every MAIL FROM, as from a server refusing us
    quit_delay: float = 0.0  # seconds before the answer to QUIT
    refuse_data: str | None = None  # the answer to the end of DATA, as from a server refusing the message or us
    data_delay: float = 0.0  # seconds between the end of DATA and the answer, as a server checking the message
    data_gate: asyncio.Event | None = None  # when set, the answer to DATA waits for it
    smtputf8: bool = False  # offer SMTPUTF8 (RFC 6531) to the sessions that start from now on, as Mailpit does
    # How many of the next DATA commands get no answer (no 354), or a hang-up:
    # the client never gets to send the message.
    silent_at_data: int = 0
    hang_up_at_data: int = 0
    silent_at_rset: bool = False  # never answer RSET
    unanswered: list[str] = field(default_factory=list)  # the commands left unanswered, or hung up on
    # Set, AUTH is offered (after STARTTLS, when there is one) and MAIL
    # refused until a session logs in with these.
    credentials: tuple[str, str] | None = None
    logins: list[Login] = field(default_factory=list)  # every AUTH, right or wrong
    answer_login: str | None = None  # the answer to every AUTH, right or wrong, as from a server busy ("454 ...")
    tls: ssl.SSLContext | None = None  # offered with STARTTLS, or from the first byte if implicit_tls
    implicit_tls: bool = False
    connections: int = 0  # every connection accepted, its TLS handshake done or not
    _server: asyncio.AbstractServer | None = None
    _sessions: set[_SinkSession] = field(default_factory=set)
    _held: HeldPort = field(default_factory=HeldPort)

    @property
    def port(self) -> int:
        return self._held.port

    # aiosmtpd's hooks: handle_<SMTP verb>
    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if self.credentials is not None and not session.authenticated:
            return "530 5.7.0 Authentication required"
        if self.refuse_sender:
            return self.refuse_sender
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        self.attempts.append(address)
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.silent_at_rset:
            self.unanswered.append("RSET")
            await asyncio.Event().wait()  # until the client hangs up: aiosmtpd cancels it then
        return "250 OK"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await asyncio.sleep(self.quit_delay)
        return "221 Bye"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.refuse_data:
            return self.refuse_data  # refused: not received
        self.received.append(Received(envelope.original_content or b"", list(envelope.rcpt_tos), time.time()))
        if self.data_delay:
            await asyncio.sleep(self.data_delay)  # aiosmtpd cancels it if the client hangs up
        if self.data_gate is not None:
            await self.data_gate.wait()
        return "250 Message accepted for delivery"

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: LoginPassword
    ) -> AuthResult:
        assert server.transport is not None
        login = Login(
            data.login.decode(), data.password.decode(), server.transport.get_extra_info("ssl_object") is not None
        )
        self.logins.append(login)
        if self.answer_login is not None:
            return AuthResult(success=False, handled=False, message=self.answer_login)
        # handled=False: aiosmtpd answers 535 5.7.8 to a wrong one.
        return AuthResult(success=(login.username, login.password) == self.credentials, handled=False)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: self._session(loop), sock=self._held.take(), ssl=self.tls if self.implicit_tls else None
        )

    def _session(self, loop: asyncio.AbstractEventLoop) -> _SinkSession:
        """A connection's session, as the sink is set now (``implicit_tls`` only takes at ``start``)."""
        starttls = None if self.implicit_tls else self.tls
        return _SinkSession(
            self,
            hostname="sink.test",
            enable_SMTPUTF8=self.smtputf8,
            tls_context=starttls,
            authenticator=self.authenticate if self.credentials else None,
            # aiosmtpd knows TLS only by STARTTLS: with none, or from the
            # first byte, a login has to be allowed without it.
            auth_require_tls=self.credentials is None or starttls is not None,
            loop=loop,
        )

    async def stop(self) -> None:
        """Stop listening and drop every session, as a server going down does.

        The port stays bound, not listening, until ``start``: a connection to
        it is refused, and nothing else takes it meanwhile (see ``HeldPort.hold_again``).

        On Python 3.11 closing a server leaves the connections it accepted
        open, and ``wait_closed`` waits for none of them: a session left so
        outlives the test's loop, and fails a later test as an unclosed socket.
        """
        if self._server is not None:
            self._server.close()
            self._server = None
        # At once, after the listening socket closed; one never started holds it still.
        self._held.hold_again()
        for session in list(self._sessions):
            if session.transport is not None:
                session.transport.close()
        await eventually(lambda: not self._sessions, within=5, what="the SMTP sessions closed")

    async def close(self) -> None:
        """``stop``, and let go of the port: the sink's end, whether it ever started or not."""
        try:
            await self.stop()
        finally:
            self._held.close()

    def to(self, address: str) -> list[EmailMessage]:
        return [r.message for r in self.received if address in r.recipients]


class _SinkSession(SMTP):
    """aiosmtpd's session, known to its sink until its connection is gone."""

    def __init__(self, sink: SmtpSink, **kwargs: Any) -> None:
        super().__init__(sink, **kwargs)
        self._sink = sink
        sink.connections += 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._sink._sessions.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._sink._sessions.discard(self)
        super().connection_lost(error)

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        await super().smtp_STARTTLS(arg)
        # asyncio ends a handshake cut short by a close (``stop``'s, before
        # the client's own hang-up arrived) as if it had succeeded, and tells
        # the session nothing: it would wait for a command forever.
        if self.transport is not None and self.transport.is_closing():
            self.connection_lost(None)

    # aiosmtpd answers the DATA command (354) before any hook: held back here.
    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        sink = self._sink
        if sink.hang_up_at_data:
            sink.hang_up_at_data -= 1
            sink.unanswered.append("DATA")
            assert self.transport is not None
            self.transport.close()
            return
        if sink.silent_at_data:
            sink.silent_at_data -= 1
            sink.unanswered.append("DATA")
            await asyncio.Event().wait()  # until the client hangs up: aiosmtpd cancels it then
        await super().smtp_DATA(arg)


@dataclass
class Silent:
    """An SMTP server that takes connections and never greets: what a hung one looks like to a client."""

    port: int
    accepted: list[asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def silent_smtp() -> AsyncIterator[Silent]:
    accepted: list[asyncio.StreamWriter] = []

    async def take(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read()

    server = await asyncio.start_server(take, "127.0.0.1", 0)
    try:
        yield Silent(server.sockets[0].getsockname()[1], accepted)
    finally:
        for writer in accepted:
            writer.close()
        server.close()
