"""Settings come from the environment: secrets are required, the rest has sensible defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiosmtplib.email import extract_sender
from tls_certs import Authority

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
PASSWORD = "smtp-password-0123456789"


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
    assert settings.smtp.recipient_hourly_limit == 10


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
        ("NOTIFY_RECIPIENT_HOURLY_LIMIT", "0"),  # every email capped, acked and gone, quietly
        ("NOTIFY_RECIPIENT_HOURLY_LIMIT", "-5"),
        ("NOTIFY_RECIPIENT_HOURLY_LIMIT", "ten"),
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


def test_the_recipient_cap_is_read_from_the_environment() -> None:
    assert Settings.from_env({**REQUIRED, "NOTIFY_RECIPIENT_HOURLY_LIMIT": "25"}).smtp.recipient_hourly_limit == 25


def test_a_display_name_with_a_comma_is_fine_quoted() -> None:
    settings = Settings.from_env({**REQUIRED, "MAIL_FROM": '"Acme, Inc." <noreply@acme.test>'})
    sender = settings.smtp.mail_from
    event_id = "6f1c2a52-7d0e-4a43-9a55-3d1c8c1d2b9e"
    msgid = message_id(event_id, "todo_completed", sender)
    rendered = render("todo_completed", {"name": "Ada", "title": "Ship it"})
    email = compose(rendered, sender=sender, recipient=Recipient("ada@example.test", "Ada"), msgid=msgid)

    [author] = email["From"].addresses
    assert (author.display_name, author.addr_spec) == ("Acme, Inc.", "noreply@acme.test")
    assert extract_sender(email) == "noreply@acme.test"  # the envelope's MAIL FROM
    assert msgid == "<6f1c2a527d0e4a439a553d1c8c1d2b9e.todo_completed@acme.test>"


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


def test_the_smtp_connection_is_plain_unless_told_and_smtp_starttls_still_means_starttls() -> None:
    assert Settings.from_env(REQUIRED).smtp.tls == "none"
    for env, mode in [
        ({"SMTP_STARTTLS": "true"}, "starttls"),  # the older setting, still honoured
        ({"SMTP_STARTTLS": "false"}, "none"),
        ({"SMTP_TLS": "implicit"}, "implicit"),
        ({"SMTP_TLS": "STARTTLS"}, "starttls"),
        ({"SMTP_TLS": "starttls", "SMTP_STARTTLS": "true"}, "starttls"),
        ({"SMTP_TLS": "implicit", "SMTP_STARTTLS": "false"}, "implicit"),  # no STARTTLS: true of implicit TLS
    ]:
        assert Settings.from_env({**REQUIRED, **env}).smtp.tls == mode, env


@pytest.mark.parametrize(
    "env",
    [
        {"SMTP_TLS": "ssl"},
        {"SMTP_TLS": "implicit", "SMTP_STARTTLS": "true"},
        {"SMTP_TLS": "none", "SMTP_STARTTLS": "true"},
        {"SMTP_TLS": "starttls", "SMTP_STARTTLS": "false"},
    ],
)
def test_a_tls_mode_unknown_or_contradicted_is_refused(env: dict[str, str]) -> None:
    with pytest.raises(SettingsError, match="SMTP_TLS"):
        Settings.from_env({**REQUIRED, **env})


@pytest.mark.parametrize("given", ["SMTP_USERNAME", "SMTP_PASSWORD"])
def test_a_login_needs_both_its_username_and_its_password(given: str) -> None:
    with pytest.raises(SettingsError, match="SMTP_USERNAME and SMTP_PASSWORD") as refused:
        Settings.from_env({**REQUIRED, given: PASSWORD})
    assert PASSWORD not in str(refused.value)


@pytest.mark.parametrize("host", ["smtp.example.test", "10.0.0.5", "mailpit"])
def test_a_password_is_not_sent_in_clear_across_a_network_unless_allowed(host: str) -> None:
    env = {**REQUIRED, "SMTP_HOST": host, "SMTP_USERNAME": "todo-mesh", "SMTP_PASSWORD": PASSWORD}
    with pytest.raises(SettingsError, match="SMTP_TLS") as refused:
        Settings.from_env(env)
    assert PASSWORD not in str(refused.value)
    assert Settings.from_env({**env, "SMTP_TLS": "starttls"}).smtp.password == PASSWORD
    assert Settings.from_env({**env, "SMTP_TLS": "implicit"}).smtp.password == PASSWORD
    assert Settings.from_env({**env, "SMTP_AUTH_INSECURE": "true"}).smtp.password == PASSWORD  # a dev server's


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "::1", "localhost"])
def test_a_password_may_go_in_clear_to_this_machine(host: str) -> None:
    env = {**REQUIRED, "SMTP_HOST": host, "SMTP_USERNAME": "todo-mesh", "SMTP_PASSWORD": PASSWORD}
    assert Settings.from_env(env).smtp.username == "todo-mesh"


def test_secrets_stay_out_of_the_settings_repr() -> None:
    env = {**REQUIRED, "SMTP_TLS": "implicit", "SMTP_USERNAME": "todo-mesh", "SMTP_PASSWORD": PASSWORD}
    settings = Settings.from_env(env)
    assert settings.smtp.password == PASSWORD
    assert "todo-mesh" in repr(settings.smtp)
    assert PASSWORD not in repr(settings)
    assert REQUIRED["SERVICE_CLIENT_SECRET"] not in repr(settings)


def test_the_ca_file_is_read_at_start(tmp_path: Path) -> None:
    env = {**REQUIRED, "SMTP_TLS": "implicit"}
    ca_file = Authority.new("todo-mesh test CA").write(tmp_path / "ca.pem")
    assert Settings.from_env({**env, "SMTP_CA_FILE": ca_file}).smtp.ca_file == ca_file
    (tmp_path / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\nnot a certificate\n-----END PRIVATE KEY-----\n")
    for path in [tmp_path / "missing.pem", tmp_path, tmp_path / "key.pem"]:
        with pytest.raises(SettingsError, match="SMTP_CA_FILE"):
            Settings.from_env({**env, "SMTP_CA_FILE": str(path)})
    with pytest.raises(SettingsError, match="SMTP_CA_FILE is only used with TLS"):
        Settings.from_env({**REQUIRED, "SMTP_CA_FILE": ca_file})
