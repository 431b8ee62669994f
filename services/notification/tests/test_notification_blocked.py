"""A relay that refuses our envelope for a reason of ours (a blocklist, a quota) is not asked again for every send.

Against a real aiosmtpd server (``smtp_sink``), with the cooldown cut to a
fraction of a second. Each send used to open a session of its own
(connect, TLS, AUTH, MAIL, RCPT) to be refused alike: with a backlog, about
170 sessions a second for a day, from an address or an account the relay
had just blocked for coming back too often.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import aiopg
import pytest
from notification_support import (
    Broker,
    Client,
    FakeUserService,
    StartService,
    eventually,
    new_user,
    todo_event,
    verification_requested,
)
from smtp_relay import an_email, settings_for
from smtp_sink import SmtpSink
from structlog.testing import capture_logs

from notification_service import session_cooldown
from notification_service.keys import CONSUMER
from notification_service.mailer import SESSIONS, Mailer
from notification_service.replies import RefusedUs

COOLDOWN = 0.3
SPAMHAUS = "550 5.7.1 Service unavailable; client [192.0.2.1] blocked using zen.spamhaus.org"
QUOTA = "550 5.4.5 Daily user sending limit exceeded"
ONE_RECIPIENT = "554 5.7.1 <{}>: Recipient address rejected: Access denied"  # Postfix's access maps
RELAY_ACCESS_DENIED = "550 5.4.1 Relay Access Denied ATTR36 [DB5EUR03FT012.eop-EUR03.prod.protection.outlook.com]"


@pytest.fixture(autouse=True)
def short_cooldown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_cooldown, "COOLDOWN", COOLDOWN)
    monkeypatch.setattr(session_cooldown, "LONGEST_COOLDOWN", 2 * COOLDOWN)


class Everyone(dict[str, str]):
    """The sink's ``refuse`` of a relay that has blocked us: every address refused alike at RCPT."""

    def __init__(self, answer: str = SPAMHAUS) -> None:
        super().__init__()
        self.answer = answer

    def __contains__(self, address: object) -> bool:
        return True

    def __getitem__(self, address: str) -> str:
        return self.answer


def cooldowns(logs: Sequence[Mapping[str, Any]]) -> list[tuple[str, object]]:
    return [(entry["event"], entry.get("seconds")) for entry in logs if entry["event"].startswith("smtp_cooldown")]


async def test_a_relay_blocking_us_at_rcpt_is_asked_once_per_cooldown_not_once_per_send(smtp: SmtpSink) -> None:
    addresses = [f"u{n}@example.test" for n in range(10)]
    smtp.refuse = Everyone()
    mailer = Mailer(settings_for(smtp))
    with capture_logs() as logs:
        for address in addresses:
            with pytest.raises(RefusedUs, match=r"550 5\.7\.1"):
                await mailer.send(an_email(address))
        # Two recipients refused alike make a block of ours: the other eight never connected.
        assert smtp.connections == 2
        assert smtp.attempts == addresses[:2]

        # Tried again by a mailbox new to the relay's refusals, as a block's
        # backlog is: refused, it begins the next cooldown at once. (One of
        # those that began this one would cost a session more: it may be
        # refused alone.)
        async def asked_again() -> bool:
            with pytest.raises(RefusedUs):
                await mailer.send(an_email("w@example.test"))
            return smtp.connections > 2

        await eventually(asked_again, within=5, what="the relay asked again once the cooldown is over")
        for address in addresses:  # refused again: another cooldown, twice as long
            with pytest.raises(RefusedUs):
                await mailer.send(an_email(address))
        assert smtp.connections == 3

        smtp.refuse = {}  # the relay lifts the block

        async def sent() -> bool:
            try:
                await mailer.send(an_email("ada@example.test"))
            except RefusedUs:
                return False
            return True

        await eventually(sent, within=5, what="a send once the cooldown is over")
        for address in addresses:
            await mailer.send(an_email(address))
    await mailer.close()
    assert smtp.connections == 4  # the session the relay took us on again, reused
    assert len(smtp.received) == 1 + len(addresses)
    assert cooldowns(logs) == [
        ("smtp_cooldown_started", COOLDOWN),
        ("smtp_cooldown_started", 2 * COOLDOWN),
        ("smtp_cooldown_ended", None),
    ]
    started = [entry for entry in logs if entry["event"] == "smtp_cooldown_started"]
    assert {(entry["log_level"], entry["reason"]) for entry in started} == {("warning", "RefusedUs")}
    assert "example.test" not in repr(logs)  # the reply's code, never the recipients


async def test_a_refusal_at_data_begins_no_cooldown_and_a_quota_at_mail_from_one_at_once(smtp: SmtpSink) -> None:
    # At DATA, about this message's content (a policy, DMARC): the next one may pass.
    smtp.refuse_data = "554 5.7.1 Message rejected under policy"
    mailer = Mailer(settings_for(smtp))
    for n in range(3):
        with pytest.raises(RefusedUs):
            await mailer.send(an_email(f"u{n}@example.test"))
    assert smtp.connections == 3  # each refused session closed, and a new one opened at once
    smtp.refuse_data = None
    # MAIL FROM names no recipient: a refusal there is about us alone.
    smtp.refuse_sender = QUOTA
    for n in range(10):
        with pytest.raises(RefusedUs, match=r"550 5\.4\.5"):
            await mailer.send(an_email(f"u{n}@example.test"))
    await mailer.close()
    assert smtp.connections == 4


async def test_concurrent_sends_to_a_relay_blocking_us_open_two_sessions(smtp: SmtpSink) -> None:
    # At start, one session at a time until the relay takes an envelope: the
    # first two refused begin the cooldown, and the others never connect.
    addresses = [f"u{n}@example.test" for n in range(2 * SESSIONS)]
    smtp.refuse = Everyone()
    mailer = Mailer(settings_for(smtp))
    outcomes = await asyncio.gather(*(mailer.send(an_email(a)) for a in addresses), return_exceptions=True)
    await mailer.close()
    assert all(isinstance(outcome, RefusedUs) for outcome in outcomes)
    assert smtp.connections == 2


async def test_mailboxes_refused_alone_hold_back_nobody_else_but_a_block_does(smtp: SmtpSink) -> None:
    # A relay's policy about one address can carry the status of a block of
    # ours. Taken for one, a single user's address would stop everyone's email.
    barred = ["barred@example.test", "Also.Barred+x@example.test"]
    for address in barred:
        smtp.refuse[address] = ONE_RECIPIENT.format(address)
    mailer = Mailer(settings_for(smtp))
    with capture_logs() as logs:
        for address in barred:  # each refused, then another's envelope taken: refused alone
            with pytest.raises(RefusedUs):  # still ours by its status: kept, retried later
                await mailer.send(an_email(address))
            await mailer.send(an_email("ada@example.test"))
        for n in range(3):  # from now on, even one right after the other
            for address in barred:
                with pytest.raises(RefusedUs):
                    await mailer.send(an_email(address))
            await mailer.send(an_email(f"u{n}@example.test"))
        assert len(smtp.received) == 5
        assert cooldowns(logs) == []

        smtp.refuse = Everyone()  # and then the relay blocks us
        connections = smtp.connections
        for address in ["v0@example.test", *barred, *(f"v{n}@example.test" for n in range(1, 5))]:
            with pytest.raises(RefusedUs):
                await mailer.send(an_email(address))
    await mailer.close()
    # v0 on the session kept, then a session each for the barred ones, which
    # count no more, and for v1, which begins the cooldown: none for the rest.
    assert smtp.connections == connections + 3
    assert cooldowns(logs) == [("smtp_cooldown_started", COOLDOWN)]


async def test_exchange_onlines_relay_access_denied_is_ours_and_begins_a_cooldown(smtp: SmtpSink) -> None:
    # EOP's answer to every RCPT while our connector is missing or wrong.
    # Taken as the recipient's (5.4.1 is also its unknown-address block),
    # every email was dead-lettered and every reminder cancelled.
    smtp.refuse = Everyone(RELAY_ACCESS_DENIED)
    mailer = Mailer(settings_for(smtp))
    with capture_logs() as logs:
        for address in ["ada@contoso.test", "bob@contoso.test", "cy@contoso.test"]:
            with pytest.raises(RefusedUs, match=r"550 5\.4\.1"):
                await mailer.send(an_email(address))
    await mailer.close()
    assert cooldowns(logs) == [("smtp_cooldown_started", COOLDOWN)]
    assert smtp.connections == 2  # the third held back by the cooldown


async def test_exchange_onlines_relay_access_denied_loses_no_event_and_cancels_no_reminder(
    service: Client, broker: Broker, smtp: SmtpSink, users: FakeUserService, pool: aiopg.Pool
) -> None:
    smtp.refuse = Everyone(RELAY_ACCESS_DENIED)
    owner = users.add(new_user())
    due_at = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
    await broker.publish(verification_requested(owner))
    await broker.publish(todo_event("created", owner["id"], {"id": "r1", "title": "Renew", "due_at": due_at}))

    async def reminder_deferred() -> bool:
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("SELECT retry_at > now(), cancelled, sent_at FROM reminders WHERE todo_id = 'r1'")
            return await cur.fetchone() == (True, False, None)

    consumer = service.app[CONSUMER]
    await eventually(
        lambda: consumer.settled["retried"] >= 1, within=10, what="the verification email kept for a retry"
    )
    await eventually(reminder_deferred, within=10, what="the reminder deferred, not cancelled")
    assert consumer.settled["dead_lettered"] == 0
    assert await broker.ready(broker.topology.dead_letters) == 0


async def test_a_backlog_at_a_relay_blocking_us_makes_few_sessions_and_is_delivered_once_it_lifts(
    start_service: StartService, broker: Broker, smtp: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    cooldown = 1.0
    monkeypatch.setattr(session_cooldown, "COOLDOWN", cooldown)
    monkeypatch.setattr(session_cooldown, "LONGEST_COOLDOWN", cooldown)
    users = [new_user() for _ in range(20)]
    smtp.refuse = Everyone()
    for user in users:
        await broker.publish(verification_requested(user))
    began = time.monotonic()
    service = await start_service()
    consumer = service.app[CONSUMER]
    # Each event failed twice: at once, then back from the 1 s retry queue.
    await eventually(lambda: consumer.settled["retried"] >= 2 * len(users), within=15, what="two rounds of retries")
    sessions, elapsed = smtp.connections, time.monotonic() - began
    # Two sessions at start, then one to three each time a cooldown is over
    # (the two that began it are tried again first: either may be refused
    # alone), not one per delivery (40).
    assert 0 < sessions <= 2 + 3 * (elapsed / cooldown)
    smtp.refuse = {}  # the relay lifts the block

    def delivered() -> Any:
        return all(smtp.to(user["email"]) for user in users)

    await eventually(delivered, within=20, what="every email once the block is lifted")
    assert len(smtp.received) == len(users)
    assert consumer.settled["dead_lettered"] == 0
    assert await broker.ready(broker.topology.dead_letters) == 0


class Clock:
    """``time.monotonic`` for session_cooldown, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


async def refused(cooldown: session_cooldown.SessionCooldown, mailbox: str) -> None:
    with pytest.raises(RefusedUs):
        async with cooldown.opening():
            raise RefusedUs("recipients refused", recipients=frozenset({mailbox}))


async def taken(cooldown: session_cooldown.SessionCooldown) -> None:
    async with cooldown.opening() as envelope_taken:
        envelope_taken()


async def test_two_mailboxes_refused_alone_begin_one_cooldown_not_one_after_another_for_a_day(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    monkeypatch.setattr(session_cooldown, "time", clock)
    cooldown = session_cooldown.SessionCooldown()
    with capture_logs() as logs:
        await refused(cooldown, "x@example.test")
        await refused(cooldown, "z@example.test")  # new, right after the other: a block's first refusals, perhaps
        assert cooldowns(logs) == [("smtp_cooldown_started", COOLDOWN)]
        with pytest.raises(RefusedUs), cooldown.reusing():  # a session still open, during the cooldown
            raise RefusedUs("recipients refused", recipients=frozenset({"z@example.test"}))

        clock.now += COOLDOWN + 1
        await refused(cooldown, "x@example.test")  # the trial send, refused alone again
        await taken(cooldown)  # another's envelope: x is refused alone
        for _ in range(3):  # both retried, one right after the other, with others' email between
            await refused(cooldown, "z@example.test")
            await taken(cooldown)
            await refused(cooldown, "x@example.test")
    assert cooldowns(logs) == [("smtp_cooldown_started", COOLDOWN), ("smtp_cooldown_ended", None)]
