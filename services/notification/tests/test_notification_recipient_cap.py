"""At most NOTIFY_RECIPIENT_HOURLY_LIMIT emails an hour from one account to one address, and 5 times that from all.

Addresses are not verified: an account set to a stranger's address, and a
todo completed and reopened in a loop, emailed that stranger some 600 times
a minute; registering the address again replayed the welcome (now the verification email). Counted per
mailbox alone, an account set to ``ada+x@`` used up Ada's own hour.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import aiopg
import pytest
from direct_sends import verify_email
from notification_support import (
    MAIL_FROM,
    Broker,
    FakeUserService,
    StartService,
    eventually,
    new_user,
    todo_event,
    verification_requested,
)
from smtp_sink import SmtpSink
from structlog.testing import capture_logs

from notification_service import recipient_cap
from notification_service.addresses import mailbox_key
from notification_service.failures import MailServerUnavailable
from notification_service.keys import CONSUMER
from notification_service.mailer import Mailer
from notification_service.notifier import Notifier, Outcome
from notification_service.settings import Settings, SmtpSettings

LIMIT = 3


async def statuses(pool: aiopg.Pool, recipient: str) -> Counter[str]:
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT status FROM notifications WHERE recipient = %s", (recipient,))
        return Counter(row[0] for row in await cur.fetchall())


async def use_up_the_hour(broker: Broker, smtp: SmtpSink, owner: dict[str, str]) -> None:
    """``LIMIT`` completions mailed to ``owner``: the hour's emails from that account used up."""
    for n in range(LIMIT):
        await broker.publish(todo_event("completed", owner["id"], {"id": f"c{n}", "title": "Done", "completed": True}))
    await eventually(lambda: len(smtp.to(owner["email"])) == LIMIT, within=15, what="the completions sent")


async def test_an_address_gets_at_most_the_limit_an_hour_and_the_rest_are_recorded_capped(
    settings: Settings,
    start_service: StartService,
    broker: Broker,
    smtp: SmtpSink,
    users: FakeUserService,
    pool: aiopg.Pool,
) -> None:
    service = await start_service(smtp=replace(settings.smtp, recipient_hourly_limit=LIMIT))
    victim = users.add(new_user())  # an account whose address is someone else's
    bystander = users.add(new_user())
    # The verification email counts too.
    events = [verification_requested(victim)]
    events += [
        todo_event("completed", victim["id"], {"id": f"t{n}", "title": f"Task {n}", "completed": True})
        for n in range(LIMIT + 3 - len(events))
    ]
    others = [
        todo_event("completed", bystander["id"], {"id": f"b{n}", "title": f"Other {n}", "completed": True})
        for n in range(LIMIT)
    ]
    with capture_logs() as logs:
        for event in [*events, *others]:
            await broker.publish(event)
        consumer = service.app[CONSUMER]
        total = len(events) + len(others)
        await eventually(lambda: consumer.settled["acked"] == total, within=15, what="every event acked")

        await eventually(lambda: len(smtp.received) >= 2 * LIMIT, within=5, what="the emails within the cap")
        assert len(smtp.to(victim["email"])) == LIMIT
        assert len(smtp.to(bystander["email"])) == LIMIT  # another address is not held back
        assert await statuses(pool, victim["email"]) == {"sent": LIMIT, "capped": 3}

        # Redelivered, a capped email is not sent either.
        for event in events:
            await broker.publish(event)
        await eventually(lambda: consumer.settled["acked"] == total + len(events), within=15, what="redeliveries")
    assert len(smtp.received) == 2 * LIMIT
    assert consumer.settled["dead_lettered"] == 0

    capped = [entry for entry in logs if entry["event"] == "recipient_capped"]
    key = mailbox_key(victim["email"])
    assert len(capped) == 3
    assert {(e["log_level"], e["recipient_domain"], e["limit"]) for e in capped} == {("warning", "example.test", LIMIT)}
    assert {e["user_id"] for e in capped} == {victim["id"]}
    assert victim["email"].split("@")[0] not in repr(logs)  # never the address
    # Nor its hash, which a list of likely addresses reverses.
    assert hashlib.sha256(key.encode()).hexdigest()[:16] not in repr(logs)


async def test_sends_side_by_side_cannot_each_find_room_for_one_more(pool: aiopg.Pool, smtp: SmtpSink) -> None:
    # Eight sessions an instance: counted one by one, each could see the
    # same count under the limit and send.
    mailer = Mailer(SmtpSettings(host="127.0.0.1", port=smtp.port, mail_from=MAIL_FROM, recipient_hourly_limit=LIMIT))
    notifier = Notifier(pool, mailer, None, sender=MAIL_FROM)  # type: ignore[arg-type]
    user = new_user()
    try:
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(verify_email(notifier, str(uuid.uuid4()), user) for _ in range(4 * LIMIT))), timeout=20
        )
    finally:
        await mailer.close()
    assert Counter(outcomes) == {Outcome.SENT: LIMIT, Outcome.CAPPED: 3 * LIMIT}
    assert len(smtp.received) == LIMIT


async def test_case_and_a_plus_tag_do_not_make_another_address(pool: aiopg.Pool, smtp: SmtpSink) -> None:
    mailer = Mailer(SmtpSettings(host="127.0.0.1", port=smtp.port, mail_from=MAIL_FROM, recipient_hourly_limit=LIMIT))
    notifier = Notifier(pool, mailer, None, sender=MAIL_FROM)  # type: ignore[arg-type]
    user = new_user()
    local, domain = user["email"].split("@")
    spellings = [user["email"], f"{local.upper()}@{domain}", f"{local}+1@{domain.upper()}", f"{local}+2@{domain}"]
    try:
        outcomes = [await verify_email(notifier, str(uuid.uuid4()), {**user, "email": email}) for email in spellings]
    finally:
        await mailer.close()
    assert outcomes == [Outcome.SENT] * LIMIT + [Outcome.CAPPED]
    assert len(smtp.received) == LIMIT


async def test_an_email_the_server_did_not_take_does_not_count(pool: aiopg.Pool, smtp: SmtpSink) -> None:
    # An outage retried for a day must not spend the address's hour: the
    # claim released when the server does not have the email takes its count.
    user = new_user()
    smtp.refuse[user["email"]] = "451 4.3.0 Try again later"
    settings = SmtpSettings(host="127.0.0.1", port=smtp.port, mail_from=MAIL_FROM, attempts=1, recipient_hourly_limit=1)
    mailer = Mailer(settings)
    notifier = Notifier(pool, mailer, None, sender=MAIL_FROM)  # type: ignore[arg-type]
    event_id = str(uuid.uuid4())
    try:
        for _ in range(3):
            with pytest.raises(MailServerUnavailable, match="deferred"):
                await verify_email(notifier, event_id, user)
        del smtp.refuse[user["email"]]
        assert await verify_email(notifier, event_id, user) is Outcome.SENT
        assert await verify_email(notifier, str(uuid.uuid4()), user) is Outcome.CAPPED  # that one did count
    finally:
        await mailer.close()


async def test_another_account_on_the_same_mailbox_does_not_use_up_its_owners_hour(
    pool: aiopg.Pool, smtp: SmtpSink
) -> None:
    # The user-service keeps lower(email) unique: ada+x@ is another account's
    # to take, and it folds to ada@.
    mailer = Mailer(SmtpSettings(host="127.0.0.1", port=smtp.port, mail_from=MAIL_FROM, recipient_hourly_limit=LIMIT))
    notifier = Notifier(pool, mailer, None, sender=MAIL_FROM)  # type: ignore[arg-type]
    owner = new_user()
    local, domain = owner["email"].split("@")
    stranger = {**new_user(), "email": f"{local}+x@{domain}"}
    try:
        outcomes = [await verify_email(notifier, str(uuid.uuid4()), stranger) for _ in range(LIMIT + 1)]
        assert outcomes == [Outcome.SENT] * LIMIT + [Outcome.CAPPED]
        assert await verify_email(notifier, str(uuid.uuid4()), owner) is Outcome.SENT
    finally:
        await mailer.close()
    assert len(smtp.to(owner["email"])) == 1


async def test_many_accounts_on_one_mailbox_get_the_mailbox_ceiling_between_them(
    pool: aiopg.Pool, smtp: SmtpSink
) -> None:
    mailer = Mailer(SmtpSettings(host="127.0.0.1", port=smtp.port, mail_from=MAIL_FROM, recipient_hourly_limit=LIMIT))
    notifier = Notifier(pool, mailer, None, sender=MAIL_FROM)  # type: ignore[arg-type]
    victim = new_user()
    local, domain = victim["email"].split("@")
    accounts = [{**new_user(), "email": f"{local}+{n}@{domain}"} for n in range(recipient_cap.MAILBOX_ACCOUNTS + 1)]
    try:
        outcomes = [await verify_email(notifier, str(uuid.uuid4()), a) for a in accounts for _ in range(LIMIT)]
    finally:
        await mailer.close()
    ceiling = recipient_cap.MAILBOX_ACCOUNTS * LIMIT
    assert outcomes == [Outcome.SENT] * ceiling + [Outcome.CAPPED] * LIMIT
    assert len(smtp.received) == ceiling


async def test_a_code_is_held_back_by_its_accounts_codes_alone_and_notices_by_everything(
    settings: Settings,
    start_service: StartService,
    broker: Broker,
    smtp: SmtpSink,
    users: FakeUserService,
    pool: aiopg.Pool,
) -> None:
    # A user whose hour of notices is used up changes to another spelling
    # of the mailbox: counted against the notices, the code was capped, for
    # good, and every resend's too, while the user-service answered 202.
    service = await start_service(smtp=replace(settings.smtp, recipient_hourly_limit=LIMIT))
    owner = users.add(new_user())
    await use_up_the_hour(broker, smtp, owner)
    local, domain = owner["email"].split("@")
    changed = f"{local.upper()}+todo@{domain}"
    assert mailbox_key(changed) == mailbox_key(owner["email"])
    await broker.publish(verification_requested({**owner, "email": changed}, reason="email_changed"))
    await eventually(lambda: len(smtp.to(changed)) == 1, within=15, what="the code sent")
    # A notice is still held back by every email of the hour, the code included.
    await broker.publish(todo_event("completed", owner["id"], {"id": "c9", "title": "Done", "completed": True}))
    consumer = service.app[CONSUMER]
    await eventually(lambda: consumer.settled["acked"] == LIMIT + 2, within=15, what="every event acked")
    assert await statuses(pool, owner["email"]) == {"sent": LIMIT, "capped": 1}
    assert await statuses(pool, changed) == {"sent": 1}
    assert len(smtp.received) == LIMIT + 1


async def test_a_reminder_over_the_cap_is_deferred_until_the_hour_frees_a_slot_not_dropped(
    settings: Settings,
    start_service: StartService,
    broker: Broker,
    smtp: SmtpSink,
    users: FakeUserService,
    pool: aiopg.Pool,
) -> None:
    service = await start_service(smtp=replace(settings.smtp, recipient_hourly_limit=LIMIT))
    owner = users.add(new_user())
    await use_up_the_hour(broker, smtp, owner)
    due_at = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
    with capture_logs() as logs:
        await broker.publish(todo_event("created", owner["id"], {"id": "r1", "title": "Renew", "due_at": due_at}))

        async def deferred() -> tuple[float, bool, object] | None:
            async with pool.acquire() as conn, conn.cursor() as cur:
                await cur.execute(
                    "SELECT extract(epoch FROM retry_at - now())::float, cancelled, sent_at"
                    " FROM reminders WHERE todo_id = 'r1' AND retry_at IS NOT NULL"
                )
                row = await cur.fetchone()
            return None if row is None else (row[0], row[1], row[2])

        retry_in, cancelled, sent_at = await eventually(deferred, within=10, what="the reminder deferred")
    assert (cancelled, sent_at) == (False, None)  # neither dropped nor marked sent
    # When the first completion leaves the hour, not in a minute as after a failure.
    assert recipient_cap.WINDOW - 120 < retry_in <= recipient_cap.WINDOW
    assert await statuses(pool, owner["email"]) == {"sent": LIMIT}  # its claim released, not capped
    [capped] = [entry for entry in logs if entry["event"] == "recipient_capped"]
    assert capped["kind"] == "reminder"
    assert len(smtp.to(owner["email"])) == LIMIT
    assert service.app[CONSUMER].settled["dead_lettered"] == 0


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("Ada.Lovelace@Example.TEST", "ada.lovelace@example.test"),
        ("ada+todo-mesh@example.test", "ada@example.test"),
        ("ada@exämple.test", "ada@xn--exmple-cua.test"),
        ("+only-a-tag@example.test", "+only-a-tag@example.test"),
    ],
)
def test_an_address_is_counted_as_one_mailbox_however_it_is_spelt(address: str, key: str) -> None:
    assert mailbox_key(address) == key
