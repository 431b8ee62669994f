"""Settings refuse what would weaken the service."""

from __future__ import annotations

import math

import pytest

from mesh_common.settings import SettingsError
from user_service.settings import Settings, TokenPolicy, parse_service_clients

ENV = {
    "DATABASE_URL": "postgresql://users:users@127.0.0.1/users",
    "REDIS_URL": "redis://127.0.0.1/0",
    "AMQP_URL": "amqp://guest:guest@127.0.0.1/",
}


def test_defaults_are_owasps_argon2id_minimum() -> None:
    policy = Settings.from_env(ENV).passwords
    assert (policy.time_cost, policy.memory_cost_kib, policy.parallelism) == (2, 19456, 1)


@pytest.mark.parametrize("weaker", [{"ARGON2_TIME_COST": "1"}, {"ARGON2_MEMORY_KIB": "8192"}])
def test_argon2_parameters_below_the_minimum_are_refused(weaker: dict[str, str]) -> None:
    with pytest.raises(SettingsError, match="OWASP"):
        Settings.from_env({**ENV, **weaker})


def test_stronger_argon2_parameters_are_allowed() -> None:
    policy = Settings.from_env({**ENV, "ARGON2_TIME_COST": "3", "ARGON2_MEMORY_KIB": "65536"}).passwords
    assert (policy.time_cost, policy.memory_cost_kib) == (3, 65536)


def test_service_clients_are_parsed_from_name_secret_pairs() -> None:
    clients = parse_service_clients(" notification-service:0123456789abcdef, todo-service:fedcba9876543210 ")
    assert clients == (("notification-service", "0123456789abcdef"), ("todo-service", "fedcba9876543210"))
    assert Settings.from_env(ENV).service_clients == ()


@pytest.mark.parametrize("raw", ["no-secret", ":0123456789abcdef", "svc:short"])
def test_malformed_or_weak_service_clients_are_refused(raw: str) -> None:
    with pytest.raises(SettingsError, match="SERVICE_CLIENTS"):
        parse_service_clients(raw)


@pytest.mark.parametrize("slots", ["0", "7"])
def test_writes_must_leave_connections_for_reads(slots: str) -> None:
    with pytest.raises(SettingsError, match="DB_WRITE_SLOTS"):
        Settings.from_env({**ENV, "DB_POOL_SIZE": "10", "DB_WRITE_SLOTS": slots})


def test_pruning_defaults_and_overrides_come_from_the_environment() -> None:
    defaults = Settings.from_env(ENV)
    assert (defaults.prune.interval, defaults.prune.batch_size) == (600.0, 1000)
    assert (defaults.prune.outbox_retention, defaults.tokens.refresh_retention) == (7 * 86400, 7 * 86400)
    tuned = Settings.from_env(
        {
            **ENV,
            "PRUNE_INTERVAL_SECONDS": "60",
            "PRUNE_BATCH_SIZE": "200",
            "OUTBOX_RETENTION_SECONDS": "3600",
            "REFRESH_TOKEN_RETENTION_SECONDS": "3600",
        }
    )
    assert (tuned.prune.interval, tuned.prune.batch_size, tuned.prune.outbox_retention) == (60.0, 200, 3600)
    assert tuned.tokens.refresh_retention == 3600


@pytest.mark.parametrize(
    "unsafe",
    [
        {"REFRESH_TOKEN_RETENTION_SECONDS": "-1"},
        {"REFRESH_TOKEN_RETENTION_SECONDS": "3599"},
        {"OUTBOX_RETENTION_SECONDS": "-1"},
        {"PRUNE_BATCH_SIZE": "0"},
        {"PRUNE_INTERVAL_SECONDS": "0"},
    ],
)
def test_retention_that_would_delete_live_rows_or_never_run_is_refused(unsafe: dict[str, str]) -> None:
    with pytest.raises(SettingsError, match=next(iter(unsafe))):
        Settings.from_env({**ENV, **unsafe})


def test_a_refresh_session_lasts_30_days_at_most_unless_told_otherwise() -> None:
    assert Settings.from_env(ENV).tokens.refresh_session_max == 30 * 86400
    tuned = Settings.from_env({**ENV, "REFRESH_TOKEN_TTL": "3600", "REFRESH_SESSION_MAX_SECONDS": "3600"})
    assert (tuned.tokens.refresh_ttl, tuned.tokens.refresh_session_max) == (3600, 3600)


@pytest.mark.parametrize(
    "shorter",
    [
        {"REFRESH_TOKEN_TTL": "3600", "REFRESH_SESSION_MAX_SECONDS": "3599"},
        {"REFRESH_TOKEN_TTL": str(31 * 86400)},  # the default maximum is 30 days
    ],
)
def test_a_refresh_session_shorter_than_one_refresh_token_is_refused(shorter: dict[str, str]) -> None:
    with pytest.raises(SettingsError, match="REFRESH_SESSION_MAX_SECONDS must be at least REFRESH_TOKEN_TTL"):
        Settings.from_env({**ENV, **shorter})


@pytest.mark.parametrize(
    "unusable",
    [
        {"ACCESS_TOKEN_TTL": "0"},
        {"ACCESS_TOKEN_TTL": "-600"},
        {"REFRESH_TOKEN_TTL": "0"},
        {"REFRESH_TOKEN_TTL": "-1"},
        {"SERVICE_TOKEN_TTL": "0"},
        {"SERVICE_TOKEN_TTL": "-300"},
        {"SIGNING_KEY_REFRESH_SECONDS": "0"},
        {"SIGNING_KEY_REFRESH_SECONDS": "-30"},
    ],
)
def test_token_lifetimes_and_the_key_refresh_interval_must_be_more_than_0(unusable: dict[str, str]) -> None:
    # A token would be expired when issued; an interval of 0 would re-read
    # the key table in a loop without a pause.
    with pytest.raises(SettingsError, match=next(iter(unusable))):
        Settings.from_env({**ENV, **unusable})


@pytest.mark.parametrize("interval", [0.0, math.nan, math.inf])
def test_a_token_policy_built_without_the_environment_refuses_an_unusable_refresh_interval(interval: float) -> None:
    # env_float refuses NaN and inf already; a policy made in code does not pass through it.
    with pytest.raises(SettingsError, match="SIGNING_KEY_REFRESH_SECONDS"):
        TokenPolicy(key_refresh_interval=interval)
