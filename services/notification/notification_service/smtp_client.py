"""aiosmtplib's client, told where DATA and the message begin, and a send's steps on it.

The message itself goes out only once the server has answered the DATA
command with 354, and what a failure means depends on which side of that
it came (mailer.py): ``SmtpClient`` notes the point, and times DATA on its
own.

After a refusal aiosmtplib resets the session with RSET, and a timeout
waiting for the answer to that replaced the refusal: a 550 to the message
became an unknown outcome, one at RCPT an outage retried for a day. A
session is never reused after an error, so RSET is not sent at all.

On Python 3.11 aiosmtplib waits for each answer with ``asyncio.wait_for``,
which swallows a cancellation that comes as the answer does: it returns the
answer, or raises what the answer was. So DATA is not sent after an
attempt's own time ran out, or after its caller's cut, however either was
taken.
"""

from __future__ import annotations

import asyncio
from email.message import EmailMessage
from typing import Any, Literal

import aiosmtplib
from aiosmtplib.typing import Default

from .replies import at_data, before_data
from .session_cooldown import Taken


class SmtpClient(aiosmtplib.SMTP):
    """aiosmtplib's client, which knows when DATA and the message begin, and times DATA on its own.

    ``send_message`` runs MAIL, RCPT and DATA with one timeout. ``data`` sends
    the DATA command, waits for the server's 354, and only then writes the
    message: from that write on, a failure no longer proves that nothing was
    sent (``body_started``).
    """

    def __init__(self, *, data_timeout: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._data_timeout = data_timeout
        self.at_data = False
        self.body_started = False
        self.until_data: asyncio.Timeout | None = None
        self.envelope_taken: Taken | None = None  # told when DATA begins: the server took MAIL and RCPT
        self.cuts = 0  # the task's cancellations pending when its send began (``Send``)

    # aiosmtplib's own signature, which ``sendmail`` calls with its timeout.
    async def data(
        self,
        message: str | bytes,
        /,
        *,
        timeout: float | Literal[Default.token] | None = Default.token,  # noqa: ASYNC109
    ) -> aiosmtplib.SMTPResponse:
        if self.envelope_taken is not None:
            self.envelope_taken()  # the server took MAIL and RCPT
        if self.until_data is not None:
            if self.until_data.expired():
                # The attempt's time ran out as RCPT was answered, and
                # aiosmtplib (its wait_for, on Python 3.11) swallowed the cut:
                # an attempt timed out before DATA, as it would have been had
                # the cut come through (rescheduling it raised RuntimeError,
                # taken for a failure at DATA and not retried).
                raise TimeoutError("the attempt's time ran out before DATA")
            self.until_data.reschedule(None)  # the attempt's deadline ends here: DATA has its own
        if cut_since(self.cuts):
            # The caller's cut (a shutdown's drain that ran out), swallowed
            # alike as RCPT was answered: the message is not to go out after
            # the caller has given up on it, and maybe on its claim.
            raise asyncio.CancelledError
        self.at_data = True
        protocol = self.protocol
        if protocol is None:  # disconnected: aiosmtplib raises for it
            return await super().data(message, timeout=self._data_timeout)
        # The protocol writes the DATA command, then the message after the
        # 354: the one point that tells them apart, with no hook of its own.
        write = protocol.write

        def write_noting_the_message(data: bytes) -> None:
            if data != b"DATA\r\n":
                self.body_started = True
            write(data)

        protocol.write = write_noting_the_message  # type: ignore[method-assign]
        try:
            return await super().data(message, timeout=self._data_timeout)
        finally:
            del protocol.write  # the method again, for the session's next message

    async def rset(
        self,
        *,
        timeout: float | Literal[Default.token] | None = Default.token,  # noqa: ASYNC109
    ) -> aiosmtplib.SMTPResponse:
        """Not sent: the session is closed instead, as after any error.

        Only ``sendmail`` calls it, after a refusal, to reuse the session. It
        lets through anything but a disconnection or an answer, and a server
        slow to answer RSET turned the refusal into a timeout. The
        disconnection it swallows, and raises the refusal.
        """
        self.close()
        raise aiosmtplib.SMTPServerDisconnected("closed, not reset: a session is not reused after an error")


async def transact(
    client: SmtpClient, message: EmailMessage, until_data: asyncio.Timeout, taken: Taken, cuts: int
) -> None:
    """MAIL, RCPT and DATA on ``client``: what a failure says, read here, for the cooldown to know a refusal."""
    client.at_data = client.body_started = False
    client.until_data, client.envelope_taken, client.cuts = until_data, taken, cuts
    try:
        await client.send_message(message)
    except Exception as exc:
        if client.at_data:
            raise at_data(exc, body_started=client.body_started) from None
        if isinstance(exc, aiosmtplib.SMTPException | OSError):
            raise before_data(exc) from None
        raise
    finally:
        client.envelope_taken = None  # the cooldown's, for this send only


def cut_since(cuts: int) -> bool:
    """Whether this task was cancelled since it had ``cuts`` pending, and the cut swallowed.

    ``Task.cancelling()`` still counts a cut that was swallowed; an
    attempt's own timeout, once over, no longer counts its own.
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() > cuts
