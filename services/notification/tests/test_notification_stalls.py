"""A server silent, or hanging up, at DATA or at RSET: whether it has the message, and whose fault a refusal is.

The message goes out only after the server's 354 to DATA: until then no
answer proves that nothing was sent. And after a refusal, a server that
does not answer the RSET aiosmtplib follows it with must not turn the
refusal into something else.
"""

from __future__ import annotations

from email.message import EmailMessage

import pytest
from notification_support import MAIL_FROM as SENDER
from smtp_sink import SmtpSink

from notification_service.directory import Recipient
from notification_service.failures import MailRejected, MailServerUnavailable
from notification_service.mailer import Mailer
from notification_service.messages import compose, render
from notification_service.settings import SmtpSettings


def an_email(to: str) -> EmailMessage:
    rendered = render("todo_completed", {"name": "Ada", "title": "Ship it"})
    return compose(rendered, sender=SENDER, recipient=Recipient(email=to, name="Ada"), msgid="<stall@todo-mesh.test>")


async def test_no_answer_to_the_data_command_means_the_server_does_not_have_the_message(smtp: SmtpSink) -> None:
    # The message goes out only after the server's 354: until then a timeout
    # proves that nothing was sent. Counted as unknown, it was given up on
    # as unconfirmed after two such stalls, never having been sent.
    smtp.silent_at_data = 1
    settings = SmtpSettings(host="127.0.0.1", port=smtp.port, mail_from=SENDER, attempts=3, data_timeout=0.3)
    mailer = Mailer(settings)
    with pytest.raises(MailServerUnavailable):
        await mailer.send(an_email("ada@example.test"))
    await mailer.close()
    assert smtp.unanswered == ["DATA"]
    # Not tried again at once: the attempt has spent its DATA timeout, and
    # another would spend one more, past what the claim's lease allows for.
    assert smtp.attempts == ["ada@example.test"]
    assert smtp.received == []


async def test_a_connection_lost_at_the_data_command_means_the_server_does_not_have_the_message(
    smtp: SmtpSink,
) -> None:
    smtp.hang_up_at_data = 1
    mailer = Mailer(SmtpSettings(host="127.0.0.1", port=smtp.port, mail_from=SENDER, attempts=3))
    with pytest.raises(MailServerUnavailable):
        await mailer.send(an_email("ada@example.test"))
    await mailer.close()
    assert smtp.unanswered == ["DATA"]
    assert smtp.received == []


@pytest.mark.parametrize("at", ["RCPT", "DATA"])
async def test_a_refusal_stays_a_refusal_when_the_server_does_not_answer_rset(smtp: SmtpSink, at: str) -> None:
    # aiosmtplib resets the envelope after a refusal, and let the RSET's
    # timeout replace the refusal: a 550 after DATA became an unknown
    # outcome, one at RCPT an outage retried for a day.
    answer = "550 5.1.1 <ada@example.test>: Recipient address rejected: User unknown"
    if at == "RCPT":
        smtp.refuse["ada@example.test"] = answer
    else:
        smtp.refuse_data = answer
    smtp.silent_at_rset = True
    settings = SmtpSettings(host="127.0.0.1", port=smtp.port, mail_from=SENDER, timeout=0.5, data_timeout=0.5)
    mailer = Mailer(settings)
    with pytest.raises(MailRejected):
        await mailer.send(an_email("ada@example.test"))
    await mailer.close()
    assert smtp.attempts == ["ada@example.test"]
