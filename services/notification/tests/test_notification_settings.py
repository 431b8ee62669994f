"""Settings come from the environment: secrets are required, the rest has sensible defaults."""

from __future__ import annotations

import pytest

from mesh_common.settings import SettingsError
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
