"""A setting that cannot be used stops the instance at start, naming it, rather than later or quietly."""

from __future__ import annotations

import pytest

from mesh_common.settings import ServiceSettings, SettingsError


def settings(**env: str) -> ServiceSettings:
    return ServiceSettings.from_env(env, name="svc", version="test")


def test_the_defaults_are_usable() -> None:
    s = settings()
    assert (s.log_format, s.check_interval, s.deregister_after) == ("console", "1s", "1m")


@pytest.mark.parametrize("raw", ["json", "JSON", " Json "])
def test_a_log_format_is_read_in_any_case(raw: str) -> None:
    assert settings(LOG_FORMAT=raw).log_format == "json"


def test_an_unknown_log_format_is_refused_not_taken_for_console() -> None:
    with pytest.raises(SettingsError, match="LOG_FORMAT must be one of console, json, got 'jsonl'"):
        settings(LOG_FORMAT="jsonl")


@pytest.mark.parametrize("raw", ["1s", "500ms", "1m30s", "1.5s", "2h", "10us", "3µs"])
def test_consul_durations_in_gos_syntax_are_taken(raw: str) -> None:
    s = settings(CONSUL_CHECK_INTERVAL=raw, CONSUL_DEREGISTER_AFTER=raw)
    assert (s.check_interval, s.deregister_after) == (raw, raw)


@pytest.mark.parametrize("name", ["CONSUL_CHECK_INTERVAL", "CONSUL_DEREGISTER_AFTER"])
@pytest.mark.parametrize("raw", ["10", "1 m", "1min", "s", "-1s", "0s", "1m-", "ten seconds"])
def test_a_duration_consul_cannot_read_is_refused(name: str, raw: str) -> None:
    with pytest.raises(SettingsError, match=name):
        settings(**{name: raw})
