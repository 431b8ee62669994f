"""Sending over SMTP, with a few quick retries for what is worth retrying.

A refused connection, a timeout, a dropped connection or a 4xx answer are
transient: tried again here with exponential backoff and full jitter, then
reported as ``MailServerUnavailable`` so that the event is retried later
from the retry queues. A 5xx answer is final (``MailRejected``).
"""

from __future__ import annotations

from email.message import EmailMessage
from typing import Any

import aiosmtplib
import backoff
import structlog

from .failures import MailRejected, MailServerUnavailable
from .settings import SmtpSettings

log = structlog.get_logger()


class Mailer:
    def __init__(self, settings: SmtpSettings) -> None:
        self._settings = settings
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

    async def _send_once(self, message: EmailMessage) -> None:
        s = self._settings
        try:
            await aiosmtplib.send(message, hostname=s.host, port=s.port, timeout=s.timeout, start_tls=s.start_tls)
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


def _transient(code: int) -> bool:
    return 400 <= code < 500


def _log_retry(details: Any) -> None:
    log.warning("smtp_retry", tries=details["tries"], wait=round(details["wait"], 3), error=str(details["exception"]))
