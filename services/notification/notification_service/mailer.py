"""Sending over SMTP: a few reused sessions, and quick retries only while nothing can have been delivered.

Sessions stay open between messages, up to ``SESSIONS`` at a time: a new
connection per email would cost a TCP (and, with STARTTLS, a TLS) handshake
and an EHLO every time. A session that has been idle for longer than
``MAX_IDLE`` is closed rather than reused, since servers drop idle clients.

Before the DATA command, a refused connection, a timeout, a dropped
connection or a 4xx answer mean the server does not have the message: tried
again here with exponential backoff and full jitter, each time on a fresh
session, then reported as ``MailServerUnavailable`` so that the event is
retried later from the retry queues. Each attempt has ``timeout`` seconds to
get that far. A 5xx answer is final, and so is a server that does not offer
SMTPUTF8 for an address that needs it.

Whose fault a 5xx is decides what becomes of the event. The recipient's or
the message's (``MailRejected``: the DLQ, the reminder cancelled) at RCPT
and after DATA, unless its enhanced status code (RFC 3463) says the server
refuses us: X.7 security or policy (relaying denied, a blocklist, DMARC),
X.3 the mail system (but X.3.4, the message too big) or X.4 the network and
routing. Those are ``MailServerUnavailable``, as is any 5xx before RCPT: a
configuration or a reputation to put right, with the events and reminders
kept meanwhile, not given up on one by one. Without an enhanced code (or
with X.0, "undefined") a 5xx says nothing more, and is taken as before: the
recipient's or the message's at RCPT and after DATA, ours before RCPT. 552
is the message too big (RFC 1870) whatever follows it. A 5xx that refuses
us is not tried again at once: it would be refused alike.

From DATA on, the message may be on the server, so nothing is retried here.
An answer still says what became of it: 250 sent, 4xx
``MailServerUnavailable``, 5xx as above. No answer (a timeout, a
dropped connection) does not: the server may have queued the message and
lost the connection before its 250 reached us. That is
``MailOutcomeUnknown``, and the notifier keeps its claim on the email rather
than let another delivery send it at once (see notifier.py). Servers often
check a message before they answer, so DATA has its own, longer timeout
(``data_timeout``; RFC 5321 allows a client up to 10 minutes).

A send cancelled under way (a shutdown's drain that ran out) raises the
cancellation, which says nothing of how far it got: the ``Send`` a slot
yields tells whether its last attempt had begun DATA.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from email.message import EmailMessage
from typing import Any, Literal

import aiosmtplib
import backoff
import structlog
from aiosmtplib.typing import Default

from .failures import MailOutcomeUnknown, MailRejected, MailServerUnavailable
from .settings import SmtpSettings

log = structlog.get_logger()

SESSIONS = 8
QUIT_TIMEOUT = 1.0
MAX_IDLE = 30.0
BACKOFF_FACTOR = 0.1  # waits of up to 0.1 s, 0.2 s, 0.4 s...


class _DeferredAtData(MailServerUnavailable):
    """A 4xx answer to DATA: nothing delivered, but the attempt has spent its DATA timeouts."""


class _RefusedUs(MailServerUnavailable):
    """A 5xx that refuses us, not the message: final for now, so not tried again at once."""


# An enhanced status code (RFC 3463) at the start of a reply's text: class.subject.detail.
_ENHANCED_STATUS = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?!\S)")


class _Client(aiosmtplib.SMTP):
    """aiosmtplib's client, which knows when DATA begins, and times it on its own.

    ``send_message`` runs MAIL, RCPT and DATA with one timeout; ``data`` is
    the step from which a failure no longer proves that nothing was sent.
    """

    def __init__(self, *, data_timeout: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._data_timeout = data_timeout
        self.data_started = False
        self.until_data: asyncio.Timeout | None = None

    # aiosmtplib's own signature, which ``sendmail`` calls with its timeout.
    async def data(
        self,
        message: str | bytes,
        /,
        *,
        timeout: float | Literal[Default.token] | None = Default.token,  # noqa: ASYNC109
    ) -> aiosmtplib.SMTPResponse:
        self.data_started = True
        if self.until_data is not None:
            self.until_data.reschedule(None)  # the attempt's deadline ends here: DATA has its own
        return await super().data(message, timeout=self._data_timeout)


class Send:
    """A slot's ``send``: hands a message to the server, and keeps whether its last attempt began DATA.

    Read after a cancellation: from DATA on, the server may have the message.
    """

    def __init__(self, send: Callable[[EmailMessage, Send], Awaitable[None]]) -> None:
        self._send = send
        self.data_started = False

    async def __call__(self, message: EmailMessage) -> None:
        self.data_started = False
        await self._send(message, self)


class Mailer:
    def __init__(self, settings: SmtpSettings) -> None:
        self._settings = settings
        self._slots = asyncio.Semaphore(SESSIONS)
        self._idle: list[tuple[_Client, float]] = []
        self._closed = False
        self._send_with_retries = backoff.on_exception(
            backoff.expo,
            MailServerUnavailable,
            max_tries=settings.attempts,
            factor=BACKOFF_FACTOR,
            jitter=backoff.full_jitter,
            # One DATA exchange per send at most: that is what bounds ``longest_send``.
            giveup=lambda exc: isinstance(exc, _DeferredAtData | _RefusedUs),
            on_backoff=_log_retry,
        )(self._send_once)

    @property
    def longest_send(self) -> float:
        """The longest ``send`` can take once it has a session slot, in seconds.

        Every attempt but one fails before DATA, within ``timeout``; the
        backoff waits are at most their exponential step; the last attempt
        may reach DATA and wait for two answers (to DATA and to the message).
        """
        s = self._settings
        waits = BACKOFF_FACTOR * (2.0 ** (s.attempts - 1) - 1)
        return s.attempts * s.timeout + waits + 2 * s.data_timeout

    async def send(self, message: EmailMessage) -> None:
        """Hand ``message`` to the SMTP server, or raise why it could not be."""
        async with self.slot() as send:
            await send(message)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[Send]:
        """A session slot, held across the caller's own steps and the ``send`` it yields.

        Waiting for a slot is no attempt's time, and may be long when the
        server is slow: a caller whose claim on the message runs for
        ``longest_send`` takes the claim inside the slot, not before it.
        """
        async with self._slots:
            yield Send(self._send_with_retries)

    async def close(self) -> None:
        # From now on a send that ends closes its session instead of keeping
        # it: one still running (a delivery past the consumer's drain) would
        # otherwise leave a session open that nothing ever closes.
        self._closed = True
        idle, self._idle = self._idle, []

        async def say_goodbye(client: _Client) -> None:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                async with asyncio.timeout(QUIT_TIMEOUT):
                    await client.quit()
            client.close()

        # All at once, and briefly: a server that does not answer QUIT must not
        # hold up a shutdown that has a grace period to keep.
        await asyncio.gather(*(say_goodbye(client) for client, _ in idle))

    async def _send_once(self, message: EmailMessage, progress: Send) -> None:
        """One attempt, on a session of its own: reused if fresh, new otherwise.

        After any error the session is closed, not reused: its state is
        unknown, and a retry gets a fresh one.
        """
        client: _Client | None = None
        try:
            async with asyncio.timeout(self._settings.timeout) as until_data:
                client = self._reuse() or await self._connect()
                client.data_started, client.until_data = False, until_data
                await client.send_message(message)
        except BaseException as exc:
            if client is not None:
                client.close()
                progress.data_started = client.data_started
            if client is not None and client.data_started and isinstance(exc, Exception):
                raise _after_data(exc) from None
            if isinstance(exc, aiosmtplib.SMTPException | OSError):
                raise _before_data(exc) from None
            raise
        progress.data_started = True
        if self._closed:
            client.close()
        else:
            self._idle.append((client, time.monotonic()))

    def _reuse(self) -> _Client | None:
        while self._idle:
            client, since = self._idle.pop()
            if client.is_connected and time.monotonic() - since < MAX_IDLE:
                return client
            client.close()
        return None

    async def _connect(self) -> _Client:
        s = self._settings
        client = _Client(
            hostname=s.host, port=s.port, timeout=s.timeout, start_tls=s.start_tls, data_timeout=s.data_timeout
        )
        await client.connect()
        return client


def _before_data(exc: aiosmtplib.SMTPException | OSError) -> Exception:
    """The server does not have the message: an answer says whether to try again."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [r.code for r in exc.recipients]
        if all(_transient(code) for code in codes):
            return MailServerUnavailable(f"recipients deferred: {codes}")
        statuses = [_status(r.code, r.message) for r in exc.recipients]
        if all(_transient(r.code) or _refuses_us(r.code, r.message) for r in exc.recipients):
            return _RefusedUs(f"recipients refused, for a reason of ours: {statuses}")
        return MailRejected(f"recipients refused: {statuses}")
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        # aiosmtplib's only use of it: an address is not ASCII and the server
        # does not offer SMTPUTF8. That is the address's lot with this server,
        # not an outage: retrying would fail the same way for a day.
        return MailRejected("the server does not offer SMTPUTF8, which the address needs")
    if isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code == 552:
        # At MAIL FROM, with the SIZE we declare: this message is too big (RFC 1870).
        return MailRejected("SMTP 552: the message is too big")
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        # Any other refusal before DATA (the greeting, EHLO, STARTTLS, AUTH,
        # MAIL FROM) refuses us, whatever the message: a configuration to put
        # right, with the events kept meanwhile, not each one given up on.
        error = _RefusedUs if exc.code >= 500 else MailServerUnavailable
        return error(f"SMTP {_status(exc.code, exc.message)}, before any recipient")
    # Refused, timed out or disconnected (aiosmtplib's connection errors are
    # OSErrors too, and so is the attempt's TimeoutError).
    return MailServerUnavailable(type(exc).__name__)


def _after_data(exc: Exception) -> Exception:
    """DATA had begun: only an answer says the server does not have the message."""
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        reply = f"SMTP {_status(exc.code, exc.message)} after DATA"
        if _transient(exc.code):
            return _DeferredAtData(reply)
        return (_RefusedUs if _refuses_us(exc.code, exc.message) else MailRejected)(reply)
    return MailOutcomeUnknown(f"no answer after DATA: {type(exc).__name__}")


def _transient(code: int) -> bool:
    return 400 <= code < 500


def _status(code: int, message: str) -> str:
    """The reply's code, and its enhanced status code if it has one: not its text, which may name the recipient."""
    status = _ENHANCED_STATUS.match(message.lstrip())
    return f"{code} {status[0]}" if status else str(code)


def _refuses_us(code: int, message: str) -> bool:
    """Whether a 5xx's enhanced status code says it refuses us, not the recipient or the message.

    False when it does not say: no enhanced code, one of another class than
    the reply's, or X.0 (other or undefined).
    """
    if code == 552:  # the message too big (RFC 1870), or the mailbox full: not ours to put right
        return False
    status = _ENHANCED_STATUS.match(message.lstrip())
    if status is None or status[1] != str(code)[0]:
        return False
    subject, detail = status[2], status[3]
    if (subject, detail) == ("3", "4"):  # "message too big for system"
        return False
    return subject in {"3", "4", "7"}


def _log_retry(details: Any) -> None:
    log.warning("smtp_retry", tries=details["tries"], wait=round(details["wait"], 3), error=str(details["exception"]))
