"""Typed settings read from the environment.

Services read the environment once, in ``__main__``, and hand frozen settings
to their app factory. Nothing here runs at import time.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, replace

_MISSING = object()


class SettingsError(RuntimeError):
    """A required setting is missing or malformed."""


def env_str(env: Mapping[str, str], name: str, default: object = _MISSING) -> str:
    value = env.get(name)
    if value is None or value == "":
        if default is _MISSING:
            raise SettingsError(f"{name} must be set")
        return str(default)
    return value


def env_int(env: Mapping[str, str], name: str, default: object = _MISSING) -> int:
    raw = env_str(env, name, default)
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None


def env_float(env: Mapping[str, str], name: str, default: object = _MISSING) -> float:
    raw = env_str(env, name, default)
    try:
        return float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None


def env_bool(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{name} must be a boolean, got {raw!r}")


def env_choice(env: Mapping[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    # Compared in lower case, so "JSON" is json; anything else is refused
    # rather than quietly taken for the default.
    raw = env_str(env, name, default).strip().lower()
    if raw not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw


def env_log_format(env: Mapping[str, str]) -> str:
    """``LOG_FORMAT``: json (one JSON object a line, for collectors) or console."""
    return env_choice(env, "LOG_FORMAT", ("console", "json"), "console")


# Go's time.ParseDuration, which Consul reads check intervals with: "10s",
# "1m30s", "500ms". Checked here, or Consul refuses the registration and the
# instance fails after it has started everything else.
_GO_DURATION = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|ms|s|m|h)")


def env_duration(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env_str(env, name, default).strip()
    parts = _GO_DURATION.findall(raw)
    if not raw or "".join(parts) != raw or not any(re.search(r"[1-9]", part) for part in parts):
        raise SettingsError(f"{name} must be a positive duration such as 10s, 1m or 1m30s, got {raw!r}")
    return raw


def _advertise_address(host: str) -> str:
    # A wildcard bind cannot be advertised: in a container the service is
    # reached on its own interface address, which its hostname resolves to.
    if host in {"0.0.0.0", "", "::"}:
        return socket.gethostbyname(socket.gethostname())
    return host


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    """Who a service instance is and where it listens and registers."""

    name: str
    version: str
    host: str
    port: int
    advertise_address: str
    consul_url: str
    log_format: str
    check_interval: str = "1s"
    deregister_after: str = "1m"

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, name: str, version: str, default_port: int = 0) -> ServiceSettings:
        # IPv4 or IPv6 ("::" is every interface, IPv4 included): the socket,
        # the Consul checks and callers' URLs follow the address's family.
        host = env_str(env, "SERVICE_HOST", "127.0.0.1")
        return cls(
            name=name,
            version=version,
            host=host,
            port=env_int(env, "SERVICE_PORT", default_port),
            advertise_address=env_str(env, "SERVICE_ADVERTISE_ADDRESS", "") or _advertise_address(host),
            consul_url=env_str(env, "CONSUL_HTTP_ADDR", "http://127.0.0.1:8500"),
            log_format=env_log_format(env),
            check_interval=env_duration(env, "CONSUL_CHECK_INTERVAL", "1s"),
            deregister_after=env_duration(env, "CONSUL_DEREGISTER_AFTER", "1m"),
        )

    @property
    def instance_id(self) -> str:
        # Address and port identify an instance on every host, natively
        # (127.0.0.1 and distinct ports) and in containers (distinct IPs).
        return f"{self.name}-{self.advertise_address}-{self.port}"

    def with_port(self, port: int) -> ServiceSettings:
        return replace(self, port=port)
