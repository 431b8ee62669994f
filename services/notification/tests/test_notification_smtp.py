"""The mailer on its own: what SMTP answers mean, its sessions and its timeouts, against the tests' SMTP sink."""

from __future__ import annotations

import asyncio
import contextlib
from email.message import EmailMessage
from typing import Any

import pytest
from notification_support import MAIL_FROM
from smtp_sink import SmtpSink
from structlog.testing import capture_logs

from mesh_common.testing import refused_port
from notification_service.directory import Recipient
from notification_service.failures import (
    MailOutcomeUnknown,
    MailRejected,
    MailServerUnavailable,
)
from notification_service.mailer import Mailer
from notification_service.messages import compose, message_id, render
from notification_service.settings import SmtpSettings
from notification_service.smtp_client import SmtpClient

SENDER = MAIL_FROM


def an_email(to: str) -> EmailMessage:
    rendered = render("todo_completed", {"name": "Ada", "title": "Ship it"})
    msgid = message_id("6f1c2a52-7d0e-4a43-9a55-3d1c8c1d2b9e", "todo_completed", SENDER)
    return compose(rendered, sender=SENDER, recipient=Recipient(email=to, name="Ada"), msgid=msgid)


# The user-service takes addresses with non-ASCII characters (RFC 6531),
# in the local part as in the domain.
@pytest.mark.parametrize("address", ["josé@example.test", "ada@exämple.test", "δοκιμή@παράδειγμα.test"])
async def test_a_non_ascii_address_is_sent_with_smtputf8_when_the_server_offers_it(
    smtp: SmtpSink, address: str
) -> None:
    smtp.smtputf8 = True  # as Mailpit and the native stack's sink
    mailer = Mailer(SmtpSettings(host="127.0.0.1", port=smtp.port, mail_from=SENDER))
    await mailer.send(an_email(address))
    await mailer.close()
    [received] = smtp.received
    assert received.recipients == [address]
    assert str(received.message["To"]) == f"Ada <{address}>"


async def test_a_server_without_smtputf8_refuses_a_non_ascii_address_for_good(smtp: SmtpSink) -> None:
    # Not an outage to wait out: that server can never take this address.
    mailer = Mailer(SmtpSettings(host="127.0.0.1", port=smtp.port, mail_from=SENDER, attempts=3))
    with pytest.raises(MailRejected):
        await mailer.send(an_email("ada@exämple.test"))
    await mailer.send(an_email("ada@example.test"))  # ASCII ones still go through
    await mailer.close()
    assert [r.recipients for r in smtp.received] == [["ada@example.test"]]


def test_message_ids_are_one_per_event_and_kind() -> None:
    event_id = "6f1c2a52-7d0e-4a43-9a55-3d1c8c1d2b9e"
    assert (
        message_id(event_id, "verify_email", SENDER) == "<6f1c2a527d0e4a439a553d1c8c1d2b9e.verify_email@todo-mesh.test>"
    )
    assert message_id(event_id, "verify_email", SENDER) != message_id(event_id, "reminder", SENDER)


async def test_a_4xx_answer_is_retried_then_reported_as_unavailable(smtp: SmtpSink) -> None:
    smtp.refuse["busy@example.test"] = "451 4.7.1 Try again later"
    mailer = Mailer(SmtpSettings(host="127.0.0.1", port=smtp.port, mail_from=SENDER, attempts=3))
    with pytest.raises(MailServerUnavailable):
        await mailer.send(an_email("busy@example.test"))
    assert smtp.attempts == ["busy@example.test"] * 3


async def test_a_5xx_answer_is_final_and_not_retried(smtp: SmtpSink) -> None:
    smtp.refuse["gone@example.test"] = "550 5.1.1 No such mailbox"
    mailer = Mailer(SmtpSettings(host="127.0.0.1", port=smtp.port, mail_from=SENDER, attempts=3))
    with pytest.raises(MailRejected):
        await mailer.send(an_email("gone@example.test"))
    assert smtp.attempts == ["gone@example.test"]


# Answers about us, not the recipient or the message: relaying, blocklists,
# DMARC (X.7), the mail system (X.3) and routing (X.4). Dead-lettered, these
# lost every event and cancelled every reminder until the server was fixed.
@pytest.mark.parametrize(
    ("at", "answer"),
    [
        ("RCPT", "554 5.7.1 <ada@example.test>: Relay access denied"),
        ("RCPT", "550 5.7.1 Service unavailable; client [192.0.2.1] blocked using zen.spamhaus.org"),
        ("RCPT", "554 5.4.6 Routing loop detected"),
        ("RCPT", "554 5.3.2 System not accepting network messages"),
        # Exchange Online Protection, our connector missing or wrong (replies.py).
        ("RCPT", "550 5.4.1 Relay Access Denied ATTR36"),
        ("RCPT", "550 5.4.1 Recipient address rejected: Access denied"),
        ("DATA", "550 5.7.26 Unauthenticated email from todo-mesh.test is not accepted due to its DMARC policy"),
        ("DATA", "554 5.7.1 Message rejected under policy"),
    ],
)
async def test_a_5xx_whose_status_refuses_us_keeps_the_message_for_later(smtp: SmtpSink, at: str, answer: str) -> None:
    await refused(smtp, at, answer, MailServerUnavailable)  # final for now: not tried again at once


# The recipient's or the message's fault, and (without an enhanced code, or
# with X.0) a 5xx that says no more: final, as it always was.
@pytest.mark.parametrize(
    ("at", "answer"),
    [
        ("RCPT", "550 5.1.1 <ada@example.test>: Recipient address rejected: User unknown"),
        ("RCPT", "552 5.2.2 Mailbox full"),
        ("RCPT", "550 No such user here"),
        ("RCPT", "550 5.0.0 Unrouteable address"),
        ("RCPT", "550 4.7.1 Not a 5xx's status"),  # of another class than the reply's: no status at all
        ("DATA", "554 5.6.0 Message content rejected"),
        ("DATA", "552 5.3.4 Message size exceeds fixed limit"),
        ("DATA", "554 5.3.4 Message too big for system"),
        ("DATA", "554 Transaction failed"),
    ],
)
async def test_a_5xx_about_the_recipient_or_the_message_or_saying_no_more_is_refused_for_good(
    smtp: SmtpSink, at: str, answer: str
) -> None:
    await refused(smtp, at, answer, MailRejected)


async def refused(smtp: SmtpSink, at: str, answer: str, failure: type[Exception]) -> None:
    """Send to ada@example.test, refused with ``answer`` at RCPT or DATA: ``failure``, after one attempt."""
    if at == "RCPT":
        smtp.refuse["ada@example.test"] = answer
    else:
        smtp.refuse_data = answer
    mailer = Mailer(SmtpSettings(host="127.0.0.1", port=smtp.port, mail_from=SENDER, attempts=3))
    with pytest.raises(failure):
        await mailer.send(an_email("ada@example.test"))
    await mailer.close()
    assert smtp.attempts == ["ada@example.test"]
    assert smtp.received == []


async def test_a_5xx_refusing_the_sender_is_the_servers_problem_not_the_messages(smtp: SmtpSink) -> None:
    # A relay that does not accept our MAIL_FROM refuses every message alike:
    # events are kept for when it is fixed, not dead-lettered one by one.
    smtp.refuse_sender = "550 5.7.1 Sender address rejected"
    mailer = Mailer(SmtpSettings(host="127.0.0.1", port=smtp.port, mail_from=SENDER, attempts=1))
    with pytest.raises(MailServerUnavailable):
        await mailer.send(an_email("ada@example.test"))
    assert smtp.attempts == []


async def test_a_message_too_big_for_the_server_is_refused_for_good(smtp: SmtpSink) -> None:
    smtp.refuse_sender = "552 5.3.4 Message size exceeds fixed limit"  # RFC 1870, at MAIL FROM
    mailer = Mailer(SmtpSettings(host="127.0.0.1", port=smtp.port, mail_from=SENDER, attempts=3))
    with pytest.raises(MailRejected):
        await mailer.send(an_email("ada@example.test"))


async def test_no_answer_after_data_is_reported_as_unknown_and_not_sent_again(smtp: SmtpSink) -> None:
    smtp.data_delay = 1.0  # the server has the message, and answers too late
    settings = SmtpSettings(host="127.0.0.1", port=smtp.port, mail_from=SENDER, attempts=3, data_timeout=0.2)
    mailer = Mailer(settings)
    with pytest.raises(MailOutcomeUnknown):
        await mailer.send(an_email("ada@example.test"))
    assert len(smtp.received) == 1  # not retried: a retry would have sent it again
    await mailer.close()


async def test_the_answer_after_data_has_its_own_longer_timeout(smtp: SmtpSink) -> None:
    smtp.data_delay = 0.5  # longer than any other step may take
    settings = SmtpSettings(host="127.0.0.1", port=smtp.port, mail_from=SENDER, timeout=0.3, data_timeout=5.0)
    mailer = Mailer(settings)
    await mailer.send(an_email("ada@example.test"))
    assert len(smtp.received) == 1
    await mailer.close()


def swallow_a_cut_after_rcpt(monkeypatch: pytest.MonkeyPatch, to: str, held: asyncio.Event | None = None) -> list[str]:
    """The first RCPT for ``to`` is answered, then held (``held`` set) until a cut, which is swallowed.

    What aiosmtplib's wait_for does on Python 3.11 when the cut comes as the
    answer does: it returns the answer. The list returned is filled then.
    """
    real_rcpt = SmtpClient.rcpt
    swallowed: list[str] = []

    async def rcpt_then_swallowed_cut(self: SmtpClient, recipient: str, *args: Any, **kwargs: Any) -> Any:
        answer = await real_rcpt(self, recipient, *args, **kwargs)
        if recipient == to and not swallowed:
            if held is not None:
                held.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(5)
            swallowed.append(recipient)
        return answer

    monkeypatch.setattr(SmtpClient, "rcpt", rcpt_then_swallowed_cut)
    return swallowed


async def test_an_attempt_whose_cut_was_swallowed_at_rcpt_is_retried_as_timed_out_before_data(
    smtp: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    swallowed = swallow_a_cut_after_rcpt(monkeypatch, "ada@example.test")
    settings = SmtpSettings(host="127.0.0.1", port=smtp.port, mail_from=SENDER, timeout=1.0, attempts=2)
    mailer = Mailer(settings)
    await mailer.send(an_email("ada@example.test"))  # was UnavailableAtData, not retried
    assert (swallowed, len(smtp.received)) == (["ada@example.test"], 1)
    await mailer.close()


async def test_a_send_whose_callers_cut_was_swallowed_at_rcpt_ends_cancelled_and_unsent(
    smtp: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A shutdown's drain that ran out cancels the delivery as RCPT is
    # answered: it sent the message anyway, after the consumer had given up.
    held = asyncio.Event()
    swallowed = swallow_a_cut_after_rcpt(monkeypatch, "ada@example.test", held)
    settings = SmtpSettings(host="127.0.0.1", port=smtp.port, mail_from=SENDER, timeout=30.0, attempts=2)
    mailer = Mailer(settings)
    sending = asyncio.create_task(mailer.send(an_email("ada@example.test")))
    async with asyncio.timeout(5):
        await held.wait()
    sending.cancel()
    await asyncio.wait({sending}, timeout=5)
    assert sending.cancelled()
    assert (swallowed, smtp.received) == (["ada@example.test"], [])
    await mailer.close()


async def test_an_envelope_taken_before_a_swallowed_cut_still_counts_for_the_cooldown(
    smtp: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server took bob's MAIL and RCPT: ada's refusal and carol's are
    # each their own mailbox's, not two in a row that refuse us.
    swallowed = swallow_a_cut_after_rcpt(monkeypatch, "bob@example.test")
    for mailbox in ("ada", "carol"):
        smtp.refuse[f"{mailbox}@example.test"] = "550 5.4.1 Relay Access Denied ATTR36"
    settings = SmtpSettings(host="127.0.0.1", port=smtp.port, mail_from=SENDER, timeout=1.0, attempts=1)
    mailer = Mailer(settings)
    with capture_logs() as logs:
        for to in ("ada@example.test", "bob@example.test", "carol@example.test"):
            with pytest.raises(MailServerUnavailable):
                await mailer.send(an_email(to))
    await mailer.close()
    assert swallowed == ["bob@example.test"]
    assert "smtp_cooldown_started" not in [entry["event"] for entry in logs]


async def test_a_send_that_ends_after_close_closes_its_session(smtp: SmtpSink) -> None:
    # A delivery still running when the service shuts down (past the
    # consumer's drain): its session must not be kept by a closed mailer,
    # where nothing would ever close it.
    smtp.data_delay = 0.3
    mailer = Mailer(SmtpSettings(host="127.0.0.1", port=smtp.port, mail_from=SENDER))
    sending = asyncio.create_task(mailer.send(an_email("ada@example.test")))
    async with asyncio.timeout(5):  # bounded: until the message is in DATA
        while not smtp.received:
            await asyncio.sleep(0.01)
    await mailer.close()
    await sending
    assert len(smtp.received) == 1
    assert mailer._idle == []  # closed, not kept


async def test_a_refused_connection_is_reported_as_unavailable() -> None:
    with refused_port() as port:
        mailer = Mailer(SmtpSettings(host="127.0.0.1", port=port, mail_from=SENDER, attempts=2))
        with pytest.raises(MailServerUnavailable):
            await mailer.send(an_email("ada@example.test"))


async def test_stopping_the_sink_drops_its_sessions_like_a_server_going_down(smtp: SmtpSink) -> None:
    # What the outage tests rely on, and what keeps a session from outliving
    # its test's loop (an unclosed socket that fails some later test).
    reader, writer = await asyncio.open_connection("127.0.0.1", smtp.port)
    try:
        assert (await asyncio.wait_for(reader.readline(), timeout=5)).startswith(b"220 ")
        await smtp.stop()
        assert await asyncio.wait_for(reader.read(), timeout=5) == b""  # the server hung up
    finally:
        writer.close()


async def test_closing_does_not_wait_long_for_a_server_that_does_not_answer_quit(smtp: SmtpSink) -> None:
    mailer = Mailer(SmtpSettings(host="127.0.0.1", port=smtp.port, mail_from=SENDER))
    await mailer.send(an_email("ada@example.test"))  # its session is kept, idle
    smtp.quit_delay = 30.0
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(mailer.close(), timeout=10)
    assert asyncio.get_running_loop().time() - started < 3  # the QUIT's own bound, not the server's pace
