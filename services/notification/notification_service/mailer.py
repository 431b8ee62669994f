"""Sending over SMTP: a few reused sessions, and quick retries for what is worth retrying.

Sessions stay open between messages, up to ``SESSIONS`` at a time: a new
connection per email would cost a TCP (and, with STARTTLS, a TLS) handshake
and an EHLO every time. A session that has been idle for longer than
``MAX_IDLE`` is closed rather than reused, since servers drop idle clients.

A refused connection, a timeout, a dropped connection or a 4xx answer are
transient: tried again here with exponential backoff and full jitter, each
time on a fresh session, then reported as ``MailServerUnavailable`` so that
the event is retried later from the retry queues. A 5xx answer is final
(``MailRejected``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from email.message import EmailMessage
from typing import Any

import aiosmtplib
import backoff
import structlog

from .failures import MailRejected, MailServerUnavailable
from .settings import SmtpSettings

log = structlog.get_logger()

SESSIONS = 8
MAX_IDLE = 30.0


class Mailer:
    def __init__(self, settings: SmtpSettings) -> None:
        self._settings = settings
        self._slots = asyncio.Semaphore(SESSIONS)
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []
        self._send_with_retries = backoff.on_exception(
            backoff.expo,
            MailServerUnavailable,
            max_tries=settings.attempts,
            factor=0.1,  # waits of up to 0.1 s, 0.2 s, 0.4 s...
            jitter=backoff.full_jitter,
            on_backoff=_log_retry,
        )(self._send_once)

    async def send(self, message: EmailMessage) -> None:
        """Hand ``message`` to the SMTP server, or raise why it could not be."""
        await self._send_with_retries(message)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for client, _ in idle:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await client.quit()
            client.close()

    async def _send_once(self, message: EmailMessage) -> None:
        try:
            async with self._session() as client:
                await client.send_message(message)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            if all(_transient(code) for code in codes):
                raise MailServerUnavailable(f"recipients deferred: {codes}") from None
            raise MailRejected(f"recipients refused: {codes}") from None
        except aiosmtplib.SMTPResponseException as exc:
            if _transient(exc.code):
                raise MailServerUnavailable(f"SMTP {exc.code}") from None
            raise MailRejected(f"SMTP {exc.code}") from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            # Refused, timed out or disconnected (aiosmtplib's connection
            # errors are OSErrors too).
            raise MailServerUnavailable(type(exc).__name__) from None

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[aiosmtplib.SMTP]:
        """A session of our own for one message: reused if fresh, new otherwise.

        After any error the session is closed, not reused: its state is
        unknown, and the retry gets a fresh one.
        """
        async with self._slots:
            client = self._reuse() or await self._connect()
            try:
                yield client
            except BaseException:
                client.close()
                raise
            self._idle.append((client, time.monotonic()))

    def _reuse(self) -> aiosmtplib.SMTP | None:
        while self._idle:
            client, since = self._idle.pop()
            if client.is_connected and time.monotonic() - since < MAX_IDLE:
                return client
            client.close()
        return None

    async def _connect(self) -> aiosmtplib.SMTP:
        s = self._settings
        client = aiosmtplib.SMTP(hostname=s.host, port=s.port, timeout=s.timeout, start_tls=s.start_tls)
        await client.connect()
        return client


def _transient(code: int) -> bool:
    return 400 <= code < 500


def _log_retry(details: Any) -> None:
    log.warning("smtp_retry", tries=details["tries"], wait=round(details["wait"], 3), error=str(details["exception"]))
