"""Settings come from the environment: secrets are required, the rest has sensible defaults."""

from __future__ import annotations

import pytest
from aiosmtplib.email import extract_sender

from mesh_common.settings import SettingsError
from notification_service.directory import Recipient
from notification_service.messages import compose, message_id, render
from notification_service.settings import Settings
from notification_service.topology import Topology

REQUIRED = {
    "DATABASE_URL": "postgresql://n:n@127.0.0.1/n",
    "AMQP_URL": "amqp://guest:guest@127.0.0.1/",
    "SERVICE_CLIENT_SECRET": "s" * 32,
}


def test_the_client_secret_and_the_urls_are_required() -> None:
    for name in REQUIRED:
        env = {k: v for k, v in REQUIRED.items() if k != name}
        with pytest.raises(SettingsError, match=name):
            Settings.from_env(env)


def test_defaults_are_those_of_the_stack() -> None:
    settings = Settings.from_env(REQUIRED)
    assert (settings.client_id, settings.user_service) == ("notification-service", "user-service")
    assert settings.topology == Topology("todo-mesh.events", "notifications")
    assert settings.topology.queue == "notifications.events"
    assert settings.prefetch == 32
    assert (settings.smtp.timeout, settings.smtp.data_timeout, settings.smtp.attempts) == (5.0, 30.0, 3)


def test_nonsense_numbers_are_refused() -> None:
    with pytest.raises(SettingsError):
        Settings.from_env({**REQUIRED, "AMQP_PREFETCH": "0"})
    with pytest.raises(SettingsError):
        Settings.from_env({**REQUIRED, "SMTP_PORT": "smtp"})
    with pytest.raises(SettingsError, match="SMTP_DATA_TIMEOUT"):
        Settings.from_env({**REQUIRED, "SMTP_DATA_TIMEOUT": "0"})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SMTP_PORT", "0"),  # failed only when the first email was sent
        ("SMTP_PORT", "65536"),
        ("SMTP_PORT", "-25"),
        ("REMINDER_LEAD_SECONDS", "0"),  # never reminded: due only once the todo is overdue
        ("REMINDER_LEAD_SECONDS", "-60"),
        ("RETRY_LIMIT", "-1"),  # every passing failure dead-lettered, and the retention unchecked
        ("EVENT_RETENTION_SECONDS", "0"),
        ("EVENT_RETENTION_SECONDS", "-1"),
    ],
)
def test_numbers_that_would_fail_later_are_refused_at_start(name: str, value: str) -> None:
    env = {**REQUIRED, name: value}
    if name == "EVENT_RETENTION_SECONDS":
        env["RETRY_LIMIT"] = "0"  # else refused as shorter than the retries
    with pytest.raises(SettingsError, match=name):
        Settings.from_env(env)


@pytest.mark.parametrize(
    "mail_from",
    [
        "Acme, Inc. <noreply@acme.test>",  # two mailboxes, the first of them "Acme": MAIL FROM:<Acme>
        "a@",  # an IndexError from composing: every event dead-lettered as a bug
        "a@b..c",  # From: <>
        "todo-mesh",
        "a@b.test, c@d.test",
        "undisclosed-senders:;",
        "team: a@b.test;",
    ],
)
def test_a_mail_from_that_is_not_one_mailbox_is_refused(mail_from: str) -> None:
    with pytest.raises(SettingsError, match="MAIL_FROM"):
        Settings.from_env({**REQUIRED, "MAIL_FROM": mail_from})


def test_a_display_name_with_a_comma_is_fine_quoted() -> None:
    settings = Settings.from_env({**REQUIRED, "MAIL_FROM": '"Acme, Inc." <noreply@acme.test>'})
    sender = settings.smtp.mail_from
    event_id = "6f1c2a52-7d0e-4a43-9a55-3d1c8c1d2b9e"
    msgid = message_id(event_id, "welcome", sender)
    rendered = render("welcome", {"name": "Ada", "username": "ada"})
    email = compose(rendered, sender=sender, recipient=Recipient("ada@example.test", "Ada"), msgid=msgid)

    [author] = email["From"].addresses
    assert (author.display_name, author.addr_spec) == ("Acme, Inc.", "noreply@acme.test")
    assert extract_sender(email) == "noreply@acme.test"  # the envelope's MAIL FROM
    assert msgid == "<6f1c2a527d0e4a439a553d1c8c1d2b9e.welcome@acme.test>"


def test_events_are_remembered_for_longer_than_they_can_be_retried() -> None:
    settings = Settings.from_env(REQUIRED)
    assert settings.retention == 30 * 24 * 3600
    # RETRY_LIMIT 2880 at the 30 s tier: an event may come back a day after it happened.
    with pytest.raises(SettingsError, match="EVENT_RETENTION_SECONDS"):
        Settings.from_env({**REQUIRED, "EVENT_RETENTION_SECONDS": "86400"})
    with pytest.raises(SettingsError, match="EVENT_RETENTION_SECONDS"):  # retries may outlast their waits
        Settings.from_env({**REQUIRED, "EVENT_RETENTION_SECONDS": "86401"})
    shorter_retries = {**REQUIRED, "EVENT_RETENTION_SECONDS": "86400", "RETRY_LIMIT": "100"}
    assert Settings.from_env(shorter_retries).retention == 86400
    with pytest.raises(SettingsError, match="PRUNE_INTERVAL_SECONDS"):
        Settings.from_env({**REQUIRED, "PRUNE_INTERVAL_SECONDS": "0"})


def test_retries_back_off_then_stay_at_the_slowest_tier() -> None:
    topology = Topology()
    delays = [topology.retry_tier(attempt) for attempt in range(1, 6)]
    assert delays == [
        ("notifications.retry.1s", 1.0),
        ("notifications.retry.5s", 5.0),
        ("notifications.retry.30s", 30.0),
        ("notifications.retry.30s", 30.0),
        ("notifications.retry.30s", 30.0),
    ]
