"""A relay as production has one: it wants a login, and TLS that we verify.

Against a real aiosmtpd server (``smtp_sink``), with a CA and certificates
made by each test (``tls_certs``). A login refused, or TLS that fails, is
ours to put right: not the recipient's fault (no dead letter), and not a
server busy for a moment (not tried again at once).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from smtp_relay import PASSWORD, USER, WRONG, an_email, relay, settings_for
from smtp_sink import Login, SmtpSink
from structlog.testing import capture_logs
from tls_certs import Authority

from notification_service.failures import MailServerUnavailable
from notification_service.mailer import Mailer
from notification_service.replies import LoginRefused, TlsFailed


@pytest.fixture
def ca() -> Authority:
    return Authority.new("todo-mesh test CA")


@pytest.fixture
def ca_file(ca: Authority, tmp_path: Path) -> str:
    return ca.write(tmp_path / "ca.pem")


async def test_a_relay_that_wants_a_login_gets_it_once_per_session(smtp: SmtpSink) -> None:
    smtp.credentials = (USER, PASSWORD)  # plaintext, on loopback: allowed without SMTP_AUTH_INSECURE
    mailer = Mailer(settings_for(smtp, username=USER, password=PASSWORD))
    for n in range(3):
        await mailer.send(an_email(f"ada{n}@example.test"))
    await mailer.close()
    assert [r.recipients for r in smtp.received] == [[f"ada{n}@example.test"] for n in range(3)]
    assert smtp.logins == [Login(USER, PASSWORD, tls=False)]  # the session was reused, logged in


async def test_a_refused_login_is_ours_to_fix_tried_once_and_its_password_never_shown(
    smtp: SmtpSink, caplog: pytest.LogCaptureFixture
) -> None:
    smtp.credentials = (USER, PASSWORD)
    settings = settings_for(smtp, username=USER, password=WRONG, attempts=3)
    mailer = Mailer(settings)
    caplog.set_level(logging.DEBUG)
    with capture_logs() as logs, pytest.raises(LoginRefused, match=r"535 5\.7\.8") as refused:
        await mailer.send(an_email("ada@example.test"))
    await mailer.close()
    assert isinstance(refused.value, MailServerUnavailable)  # retried later, from the retry queues
    assert smtp.connections == 1  # not at once: it would be refused alike
    assert {login.password for login in smtp.logins} == {WRONG}  # (aiosmtplib tries PLAIN, then LOGIN)
    assert smtp.received == []
    for shown in (str(refused.value), repr(refused.value), repr(settings), repr(logs), caplog.text):
        assert WRONG not in shown


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
async def test_tls_verifies_the_relay_by_the_ca_file_then_logs_in(
    tls: str, ca: Authority, ca_file: str, tmp_path: Path
) -> None:
    # STARTTLS: the sink offers AUTH only once TLS is on, as a careful relay does.
    options = {"tls": ca.server_context(tmp_path), "implicit_tls": tls == "implicit", "credentials": (USER, PASSWORD)}
    async with relay(**options) as sink:
        mailer = Mailer(settings_for(sink, tls=tls, ca_file=ca_file, username=USER, password=PASSWORD))
        await mailer.send(an_email("ada@example.test"))
        await mailer.send(an_email("bob@example.test"))
        await mailer.close()
    assert [r.recipients for r in sink.received] == [["ada@example.test"], ["bob@example.test"]]
    assert sink.logins == [Login(USER, PASSWORD, tls=True)]


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
async def test_a_relay_whose_certificate_our_ca_did_not_sign_gets_no_message_and_no_password(
    tls: str, ca_file: str, tmp_path: Path
) -> None:
    stranger = Authority.new("someone else's CA")
    options = {"tls": stranger.server_context(tmp_path), "implicit_tls": tls == "implicit"}
    async with relay(**options, credentials=(USER, PASSWORD)) as sink:
        mailer = Mailer(settings_for(sink, tls=tls, ca_file=ca_file, username=USER, password=PASSWORD, attempts=3))
        with pytest.raises(TlsFailed, match="CERTIFICATE_VERIFY_FAILED"):
            await mailer.send(an_email("ada@example.test"))
        await mailer.close()
    assert sink.connections == 1  # not tried again at once: it would fail alike
    assert (sink.logins, sink.received) == ([], [])


async def test_a_certificate_for_another_host_is_refused(ca: Authority, ca_file: str, tmp_path: Path) -> None:
    async with relay(tls=ca.server_context(tmp_path, host="127.0.0.2"), implicit_tls=True) as sink:
        mailer = Mailer(settings_for(sink, tls="implicit", ca_file=ca_file))
        with pytest.raises(TlsFailed, match="mismatch"):
            await mailer.send(an_email("ada@example.test"))
        await mailer.close()
    assert sink.received == []


@pytest.mark.parametrize(
    ("tls", "why"),
    [
        ("starttls", "STARTTLS"),  # required, not attempted: a stripped STARTTLS is no reason to go on in clear
        ("implicit", "WRONG_VERSION_NUMBER"),  # SMTP_TLS=implicit for a port that speaks plain SMTP
    ],
)
async def test_tls_that_a_plain_relay_cannot_give_is_ours_to_fix(smtp: SmtpSink, tls: str, why: str) -> None:
    mailer = Mailer(settings_for(smtp, tls=tls, username=USER, password=PASSWORD, attempts=3))
    with pytest.raises(TlsFailed, match=why):
        await mailer.send(an_email("ada@example.test"))
    await mailer.close()
    assert smtp.connections == 1
    assert (smtp.logins, smtp.received) == ([], [])


async def test_a_relay_that_offers_no_login_is_not_sent_to_without_one(smtp: SmtpSink) -> None:
    # Credentials are set because the relay needs them: one that does not
    # ask is the wrong relay, or an old configuration.
    mailer = Mailer(settings_for(smtp, username=USER, password=PASSWORD, attempts=3))
    with pytest.raises(LoginRefused, match="AUTH"):
        await mailer.send(an_email("ada@example.test"))
    await mailer.close()
    assert smtp.connections == 1
    assert smtp.received == []
