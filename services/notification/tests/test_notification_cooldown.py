"""A refused login, or TLS that fails, is not tried again for every send: no new session for a cooldown.

Against a real aiosmtpd server that wants a login (``smtp_sink``), with the
cooldown cut to a fraction of a second, and time moved by sending until the
server sees a connection, bounded: a relay locks an account after a few
failed logins, and a backlog tried one login per event made hundreds.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from notification_support import Broker, StartService, eventually, new_user, verification_requested
from smtp_relay import PASSWORD, USER, WRONG, an_email, relay, settings_for
from smtp_sink import Login, SmtpSink
from structlog.testing import capture_logs
from tls_certs import Authority

from notification_service import session_cooldown
from notification_service.failures import MailServerUnavailable
from notification_service.keys import CONSUMER
from notification_service.mailer import SESSIONS, Mailer
from notification_service.replies import LoginRefused, RefusedUs, TlsFailed
from notification_service.settings import Settings

COOLDOWN = 0.3


@pytest.fixture(autouse=True)
def short_cooldown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_cooldown, "COOLDOWN", COOLDOWN)
    monkeypatch.setattr(session_cooldown, "LONGEST_COOLDOWN", 2 * COOLDOWN)


async def sent(mailer: Mailer, to: str = "ada@example.test") -> bool:
    """Whether a send went through; False if it failed as the server refusing us does."""
    try:
        await mailer.send(an_email(to))
    except RefusedUs:
        return False
    return True


async def test_a_wrong_password_is_tried_once_per_cooldown_not_once_per_send(smtp: SmtpSink) -> None:
    smtp.credentials = (USER, PASSWORD)
    mailer = Mailer(settings_for(smtp, username=USER, password=WRONG))
    with capture_logs() as logs:
        for n in range(10):
            with pytest.raises(LoginRefused, match=r"535 5\.7\.8"):
                await mailer.send(an_email(f"ada{n}@example.test"))
        assert smtp.connections == 1  # one login for ten sends; the others never connected

        async def refused_again() -> bool:
            assert not await sent(mailer)
            return smtp.connections > 1

        await eventually(refused_again, within=5, what="a login tried again once the cooldown is over")
        for _ in range(5):  # another cooldown, twice as long
            with pytest.raises(LoginRefused):
                await mailer.send(an_email("ada@example.test"))
    await mailer.close()
    assert smtp.connections == 2
    assert {login.password for login in smtp.logins} == {WRONG}
    assert len(smtp.logins) == 4  # two sessions, two mechanisms each (PLAIN, then LOGIN)
    assert smtp.received == []
    started = [entry for entry in logs if entry["event"] == "smtp_cooldown_started"]
    assert [(entry["log_level"], entry["reason"], entry["seconds"]) for entry in started] == [
        ("warning", "LoginRefused", COOLDOWN),
        ("warning", "LoginRefused", 2 * COOLDOWN),
    ]
    assert WRONG not in repr(logs)


async def test_once_the_relay_takes_the_login_the_first_send_after_the_cooldown_goes_through(smtp: SmtpSink) -> None:
    smtp.credentials = (USER, PASSWORD)
    mailer = Mailer(settings_for(smtp, username=USER, password=WRONG))
    with capture_logs() as logs:
        assert not await sent(mailer)
        smtp.credentials = (USER, WRONG)  # the relay's account is set to the password we have
        assert not await sent(mailer)  # the cooldown holds: not tried yet
        assert smtp.connections == 1
        await eventually(lambda: sent(mailer), within=5, what="a send once the cooldown is over")
        for n in range(3):
            await mailer.send(an_email(f"bob{n}@example.test"))
    await mailer.close()
    assert smtp.connections == 2  # the session that logged in, reused
    assert smtp.logins[-1] == Login(USER, WRONG, tls=False)
    assert len(smtp.received) == 4
    events = [entry["event"] for entry in logs if entry["event"].startswith("smtp_cooldown")]
    assert events == ["smtp_cooldown_started", "smtp_cooldown_ended"]


async def test_concurrent_sends_open_one_session_until_the_login_is_taken(smtp: SmtpSink) -> None:
    # More sends than session slots: each slot's send would otherwise log in.
    many = 2 * SESSIONS
    smtp.credentials = (USER, PASSWORD)
    mailer = Mailer(settings_for(smtp, username=USER, password=WRONG))

    async def all_at_once() -> list[BaseException | None]:
        sends = (mailer.send(an_email(f"u{n}@example.test")) for n in range(many))
        return await asyncio.gather(*sends, return_exceptions=True)

    # At start: one session opens, and the others wait for it, then fail as it did.
    assert all(isinstance(outcome, LoginRefused) for outcome in await all_at_once())
    assert smtp.connections == 1

    # Once the cooldown is over: one of the sends waiting then tries again, not each.
    async def tried_again() -> bool:
        assert all(isinstance(outcome, LoginRefused) for outcome in await all_at_once())
        return smtp.connections > 1

    await eventually(tried_again, within=5, what="a login tried again once the cooldown is over")
    assert smtp.connections == 2

    smtp.credentials = (USER, WRONG)

    async def all_sent() -> bool:
        outcomes = await all_at_once()
        assert all(outcome is None or isinstance(outcome, LoginRefused) for outcome in outcomes)
        return outcomes == [None] * many

    await eventually(all_sent, within=5, what="every send once the login is taken")
    await mailer.close()
    assert smtp.connections <= 2 + SESSIONS  # the login taken, sessions open side by side again
    assert len(smtp.received) == many


async def test_tls_that_fails_cools_down_the_same_way(tmp_path: Path) -> None:
    ours, stranger = Authority.new("todo-mesh test CA"), Authority.new("someone else's CA")
    ca_file = ours.write(tmp_path / "ca.pem")
    (tmp_path / "ours").mkdir()
    (tmp_path / "stranger").mkdir()
    async with relay(tls=stranger.server_context(tmp_path / "stranger"), credentials=(USER, PASSWORD)) as sink:
        mailer = Mailer(settings_for(sink, tls="starttls", ca_file=ca_file, username=USER, password=PASSWORD))
        for _ in range(5):
            with pytest.raises(TlsFailed, match="CERTIFICATE_VERIFY_FAILED"):
                await mailer.send(an_email("ada@example.test"))
        assert sink.connections == 1
        sink.tls = ours.server_context(tmp_path / "ours")  # the relay's certificate put right
        await eventually(lambda: sent(mailer), within=5, what="a send once the cooldown is over")
        await mailer.send(an_email("bob@example.test"))
        await mailer.close()
    assert sink.connections == 2
    assert sink.logins == [Login(USER, PASSWORD, tls=True)]  # no password to the server we could not verify
    assert len(sink.received) == 2


@pytest.mark.parametrize("trouble", ["down", "busy"])
async def test_a_server_down_or_busy_neither_begins_a_cooldown_nor_ends_one(smtp: SmtpSink, trouble: str) -> None:
    smtp.credentials = (USER, PASSWORD)
    mailer = Mailer(settings_for(smtp, username=USER, password=WRONG, attempts=1))
    with capture_logs() as logs:
        assert not await sent(mailer)
        if trouble == "down":
            await smtp.stop()
        else:
            smtp.answer_login = "454 4.7.0 Temporary authentication failure"
        # During the cooldown the server is not asked: the refusal stands, down or busy.
        with pytest.raises(LoginRefused):
            await mailer.send(an_email("ada@example.test"))

        async def unavailable() -> bool:
            try:
                await mailer.send(an_email("ada@example.test"))
            except LoginRefused:
                return False
            except MailServerUnavailable as exc:
                assert not isinstance(exc, RefusedUs)
                return True
            raise AssertionError("sent to a server down or busy")

        await eventually(unavailable, within=5, what="the server tried again once the cooldown is over")
        # Down or busy is no refusal: no cooldown begins, and the next send tries again at once.
        smtp.credentials, smtp.answer_login = (USER, WRONG), None
        if trouble == "down":
            await smtp.start()
        await mailer.send(an_email("bob@example.test"))
    await mailer.close()
    assert [r.recipients for r in smtp.received] == [["bob@example.test"]]
    started = [entry for entry in logs if entry["event"] == "smtp_cooldown_started"]
    assert len(started) == 1


async def test_a_backlog_with_a_wrong_password_makes_few_logins_and_is_delivered_once_it_is_right(
    settings: Settings, start_service: StartService, broker: Broker, smtp: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    cooldown = 1.0
    monkeypatch.setattr(session_cooldown, "COOLDOWN", cooldown)
    monkeypatch.setattr(session_cooldown, "LONGEST_COOLDOWN", cooldown)
    smtp.credentials = (USER, PASSWORD)
    users = [new_user() for _ in range(20)]
    for user in users:
        await broker.publish(verification_requested(user))
    began = time.monotonic()
    service = await start_service(smtp=replace(settings.smtp, username=USER, password=WRONG))
    consumer = service.app[CONSUMER]
    # Each event failed twice: at once, then back from the 1 s retry queue.
    await eventually(lambda: consumer.settled["retried"] >= 2 * len(users), within=15, what="two rounds of retries")
    sessions, elapsed = smtp.connections, time.monotonic() - began
    # One session at start, then one each time a cooldown is over: not one per delivery (40).
    assert 0 < sessions <= 2 + elapsed / cooldown
    assert len(smtp.logins) <= 2 * sessions  # (two mechanisms tried on each)
    assert {login.password for login in smtp.logins} == {WRONG}
    smtp.credentials = (USER, WRONG)  # the relay's account is set to the password we have

    def delivered() -> Any:
        return all(smtp.to(user["email"]) for user in users)

    await eventually(delivered, within=20, what="every email once the login is taken")
    assert len(smtp.received) == len(users)
    assert consumer.settled["dead_lettered"] == 0
    assert await broker.ready(broker.topology.dead_letters) == 0
