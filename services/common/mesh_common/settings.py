"""Typed settings read from the environment.

Services read the environment once, in ``__main__``, and hand frozen settings
to their app factory. Nothing here runs at import time.
"""

from __future__ import annotations

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
            log_format=env_str(env, "LOG_FORMAT", "console"),
            check_interval=env_str(env, "CONSUL_CHECK_INTERVAL", "1s"),
            deregister_after=env_str(env, "CONSUL_DEREGISTER_AFTER", "1m"),
        )

    @property
    def instance_id(self) -> str:
        # Address and port identify an instance on every host, natively
        # (127.0.0.1 and distinct ports) and in containers (distinct IPs).
        return f"{self.name}-{self.advertise_address}-{self.port}"

    def with_port(self, port: int) -> ServiceSettings:
        return replace(self, port=port)
