"""Sending over SMTP: a few reused sessions, and quick retries only while nothing can have been delivered.

Sessions stay open between messages, up to ``SESSIONS`` at a time: a new
connection per email would cost a TCP (and, with TLS, a TLS) handshake, an
EHLO and a login every time. A session that has been idle for longer than
``MAX_IDLE`` is closed rather than reused, since servers drop idle clients.
How a session is opened (TLS, AUTH) is smtp_options.py's.

Before the DATA command, a refused connection, a timeout, a dropped
connection or a 4xx answer mean the server does not have the message: tried
again here with exponential backoff and full jitter, each time on a fresh
session, then reported as ``MailServerUnavailable`` so that the event is
retried later from the retry queues. Each attempt has ``timeout`` seconds to
get that far. A 5xx answer is final, and so is a server that does not offer
SMTPUTF8 for an address that needs it.

Whose fault a 5xx is decides what becomes of the event: see replies.py. A
5xx that refuses us is not tried again at once: it would be refused alike.
Nor is a login the server refuses, or TLS that fails (a certificate that
does not verify, STARTTLS not offered): our settings or the server's
certificate to put right, not the server busy. Nor, before DATA, is any of
them tried again for the next message: no new session opens for a while
after one (session_cooldown.py), since each would be refused alike, and a
relay locks an account, or blocks an address, that keeps coming back.

The message itself goes out only once the server has answered the DATA
command with 354. No answer to DATA (a timeout, a dropped connection) is
still a server that does not have the message: ``MailServerUnavailable``,
but not tried again at once, since the attempt may have spent its DATA
timeout. Once the message has begun to go out it may be on the server, so
nothing is retried here. An answer still says what became of it: 250 sent,
4xx ``MailServerUnavailable``, 5xx as above. No answer (a timeout, a
dropped connection) does not: the server may have queued the message and
lost the connection before its 250 reached us. That is
``MailOutcomeUnknown``, and the notifier keeps its claim on the email rather
than let another delivery send it at once (see notifier.py). Servers often
check a message before they answer, so DATA has its own, longer timeout
(``data_timeout``, for the 354 and again for the answer to the message;
RFC 5321 allows a client up to 10 minutes for the latter).

A send cancelled under way (a shutdown's drain that ran out) raises the
cancellation, which says nothing of how far it got: the ``Send`` a slot
yields tells whether its last attempt had begun to send the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from email.message import EmailMessage
from typing import Any

import aiosmtplib
import backoff
import structlog

from .failures import MailServerUnavailable
from .replies import RefusedUs, UnavailableAtData, before_data
from .session_cooldown import SessionCooldown
from .settings import SmtpSettings
from .smtp_client import SmtpClient, cut_since, transact
from .smtp_options import client_options

log = structlog.get_logger()

SESSIONS = 8
QUIT_TIMEOUT = 1.0
MAX_IDLE = 30.0
BACKOFF_FACTOR = 0.1  # waits of up to 0.1 s, 0.2 s, 0.4 s...


class Send:
    """A slot's ``send``: hands a message to the server, and keeps whether its last attempt began to send it.

    Read after a cancellation: once the message has begun to go out, the server may have it.
    """

    def __init__(self, send: Callable[[EmailMessage, Send], Awaitable[None]]) -> None:
        self._send = send
        self.body_started = False
        self.cuts = 0

    async def __call__(self, message: EmailMessage) -> None:
        self.body_started = False
        task = asyncio.current_task()
        self.cuts = 0 if task is None else task.cancelling()
        await self._send(message, self)


class Mailer:
    def __init__(self, settings: SmtpSettings) -> None:
        self._settings = settings
        self._options = client_options(settings)
        self._slots = asyncio.Semaphore(SESSIONS)
        self._idle: list[tuple[SmtpClient, float]] = []
        self._cooldown = SessionCooldown()
        self._closed = False
        self._send_with_retries = backoff.on_exception(
            backoff.expo,
            MailServerUnavailable,
            max_tries=settings.attempts,
            factor=BACKOFF_FACTOR,
            jitter=backoff.full_jitter,
            # One DATA exchange per send at most: that is what bounds ``longest_send``.
            giveup=lambda exc: isinstance(exc, UnavailableAtData | RefusedUs),
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

    @property
    def recipient_hourly_limit(self) -> int:
        """Emails to one address in a rolling hour: a mail setting, which the notifier enforces (recipient_cap.py)."""
        return self._settings.recipient_hourly_limit

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

        async def say_goodbye(client: SmtpClient) -> None:
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
        if cut_since(progress.cuts):  # swallowed by the attempt before, and taken for its failure
            raise asyncio.CancelledError
        client: SmtpClient | None = None
        try:
            async with asyncio.timeout(self._settings.timeout) as until_data:
                if (client := self._reuse()) is not None:
                    with self._cooldown.reusing() as taken:
                        await transact(client, message, until_data, taken, progress.cuts)
                else:
                    # A new session, held back during a cooldown: how its
                    # opening and its envelope went decides the next ones.
                    async with self._cooldown.opening() as taken:
                        client = await self._connect()
                        await transact(client, message, until_data, taken, progress.cuts)
        except BaseException as exc:
            if client is not None:
                client.close()
                progress.body_started = client.body_started
            if isinstance(exc, aiosmtplib.SMTPException | OSError):  # the attempt's timeout, before DATA
                raise before_data(exc) from None
            raise
        progress.body_started = True
        if self._closed:
            client.close()
        else:
            self._idle.append((client, time.monotonic()))

    def _reuse(self) -> SmtpClient | None:
        while self._idle:
            client, since = self._idle.pop()
            if client.is_connected and time.monotonic() - since < MAX_IDLE:
                return client
            client.close()
        return None

    async def _connect(self) -> SmtpClient:
        # Connected, through TLS, and logged in: aiosmtplib closes the session if any of it fails.
        # What it failed with is read here, for the cooldown to know a refusal.
        client = SmtpClient(data_timeout=self._settings.data_timeout, **self._options)
        try:
            await client.connect()
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise before_data(exc) from None
        return client


def _log_retry(details: Any) -> None:
    log.warning("smtp_retry", tries=details["tries"], wait=round(details["wait"], 3), error=str(details["exception"]))
