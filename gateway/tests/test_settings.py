"""Gateway settings: a value that would quietly break the gateway is refused at start."""

from __future__ import annotations

import pytest

from mesh_common.settings import SettingsError
from mesh_gateway.settings import Settings

BASE = {"REDIS_URL": "redis://127.0.0.1:1/0"}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        # aiohttp reads a body limit of 0 as no limit at all.
        ("GATEWAY_MAX_BODY", "0"),
        ("GATEWAY_MAX_BODY", "-1"),
        # Every connection would time out, and every breaker open on healthy instances.
        ("GATEWAY_CONNECT_TIMEOUT", "0"),
        ("GATEWAY_CONNECT_TIMEOUT", "-0.5"),
        ("GATEWAY_CONNECT_TIMEOUT", "nan"),
        ("GATEWAY_CONNECT_TIMEOUT", "inf"),
        ("RATE_LIMIT_PER_IP", "0"),
        ("RATE_LIMIT_PER_USER", "-5"),
        ("RATE_LIMIT_AUTH_PER_IP", "0"),
    ],
)
def test_a_setting_that_would_break_the_gateway_quietly_is_refused(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({**BASE, name: value})


def test_the_defaults_stand() -> None:
    settings = Settings.from_env(BASE)
    assert (settings.max_body, settings.connect_timeout) == (1024 * 1024, 0.5)
