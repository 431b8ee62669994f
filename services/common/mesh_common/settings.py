"""Typed settings read from the environment.

Services read the environment once, in ``__main__``, and hand frozen settings
to their app factory. Nothing here runs at import time.
"""

from __future__ import annotations

import ipaddress
import math
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from yarl import URL

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
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    # float() takes "nan", "inf" and "1e999": a NaN passes every "<= 0" check
    # a caller makes, and an infinite interval switches its work off.
    if not math.isfinite(value):
        raise SettingsError(f"{name} must be a finite number, got {raw!r}")
    return value


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
_GO_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _seconds(parts: list[tuple[str, str]]) -> float:
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def env_duration(
    env: Mapping[str, str],
    name: str,
    default: str,
    *,
    at_least: str | None = None,
    at_most: tuple[str, str] | None = None,
) -> str:
    """A duration in Go's syntax.

    ``at_least`` is a floor Consul would otherwise apply without a word;
    ``at_most``, a ceiling and the reason for it.
    """
    raw = env_str(env, name, default).strip()
    parts = _GO_DURATION.findall(raw)
    if not raw or "".join(n + u for n, u in parts) != raw or not any(re.search(r"[1-9]", n) for n, _ in parts):
        raise SettingsError(f"{name} must be a positive duration such as 10s, 1m or 1m30s, got {raw!r}")
    if at_least is not None and _seconds(parts) < _seconds(_GO_DURATION.findall(at_least)):
        raise SettingsError(f"{name} must be at least {at_least}, Consul's minimum, got {raw!r}")
    if at_most is not None and _seconds(parts) > _seconds(_GO_DURATION.findall(at_most[0])):
        raise SettingsError(f"{name} must be at most {at_most[0]} ({at_most[1]}), got {raw!r}")
    return raw


# Consul raises a shorter DeregisterCriticalServiceAfter to this, silently:
# an instance configured to be reaped after 10s would linger for a minute.
CONSUL_MIN_DEREGISTER_AFTER = "1m"
# And a shorter check interval to this, with a warning in its own log only.
CONSUL_MIN_CHECK_INTERVAL = "1s"
# Re-registering after an agent's restart, an instance tells Consul its
# checks pass if one was answered in the last 30 s (health.ANSWERED_LATELY);
# checks called less often than this would have it start them critical,
# out of the healthy set, for an interval.
CHECK_INTERVAL_MAX = ("10s", "checks answered within 30 s keep an instance passing through an agent's restart")
# The agent's own ports, plain and TLS: a URL's defaults (80, 443) are never Consul's.
CONSUL_PORTS = {"http": 8500, "https": 8501}
_HOST_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?")


def _is_host(host: str | None) -> bool:
    if not host:
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return all(_HOST_LABEL.fullmatch(label) for label in host.removesuffix(".").split("."))
    return True


def env_consul_url(env: Mapping[str, str]) -> str:
    """``CONSUL_HTTP_ADDR`` as ``scheme://host:port``.

    Also in the Consul CLI's form, ``127.0.0.1:8500``, which is plain http.
    Without a port it is Consul's, 8500, where a URL's would be 80 or 443.
    """
    raw = env_str(env, "CONSUL_HTTP_ADDR", f"http://127.0.0.1:{CONSUL_PORTS['http']}").strip()
    try:
        url: URL | None = URL(raw if "://" in raw else f"http://{raw}")
    except ValueError:  # a port that is not a number, or out of range
        url = None
    if (
        url is None
        or url.scheme not in {"http", "https"}
        or not _is_host(url.host)
        or url.explicit_port == 0
        or url.path not in {"", "/"}
        or url.user is not None
        or url.query_string
        or url.fragment
    ):
        raise SettingsError(
            f"CONSUL_HTTP_ADDR must be an http or https address such as http://127.0.0.1:8500 (or 127.0.0.1:8500),"
            f" got {raw!r}"
        )
    return str(URL.build(scheme=url.scheme, host=url.host or "", port=url.explicit_port or CONSUL_PORTS[url.scheme]))


def env_port(env: Mapping[str, str], name: str, default: int, *, lowest: int = 0) -> int:
    """A TCP port, ``lowest`` to 65535.

    0 is one the kernel picks, to listen on (tests, and a second instance
    natively); a port to connect to starts at 1.
    """
    port = env_int(env, name, default)
    if not lowest <= port <= 65535:
        raise SettingsError(f"{name} must be a port number, {lowest} to 65535, got {port}")
    return port


def _advertise_address(host: str) -> str:
    # A wildcard bind cannot be advertised: in a container the service is
    # reached on its own interface address, which its hostname resolves to.
    if host in {"0.0.0.0", "", "::"}:
        name = socket.gethostname()
        try:
            return socket.gethostbyname(name)
        except OSError as exc:  # gaierror: e.g. an IPv6-only container, whose name has no IPv4 address
            raise SettingsError(
                f"SERVICE_ADVERTISE_ADDRESS must be set: SERVICE_HOST={host} listens on every interface,"
                f" and this host's name {name!r} has no IPv4 address to register in its place ({exc})"
            ) from None
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
    # The ACL token every call to Consul carries; None where ACLs are off.
    # Out of the repr, which may reach a log.
    consul_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, name: str, version: str, default_port: int = 0) -> ServiceSettings:
        # IPv4 or IPv6 ("::" is every interface, IPv4 included): the socket,
        # the Consul checks and callers' URLs follow the address's family.
        host = env_str(env, "SERVICE_HOST", "127.0.0.1")
        return cls(
            name=name,
            version=version,
            host=host,
            port=env_port(env, "SERVICE_PORT", default_port),
            advertise_address=env_str(env, "SERVICE_ADVERTISE_ADDRESS", "") or _advertise_address(host),
            consul_url=env_consul_url(env),
            log_format=env_log_format(env),
            check_interval=env_duration(
                env, "CONSUL_CHECK_INTERVAL", "1s", at_least=CONSUL_MIN_CHECK_INTERVAL, at_most=CHECK_INTERVAL_MAX
            ),
            deregister_after=env_duration(env, "CONSUL_DEREGISTER_AFTER", "1m", at_least=CONSUL_MIN_DEREGISTER_AFTER),
            consul_token=env_str(env, "CONSUL_HTTP_TOKEN", "") or None,
        )

    @property
    def instance_id(self) -> str:
        # Address and port identify an instance on every host, natively
        # (127.0.0.1 and distinct ports) and in containers (distinct IPs).
        return f"{self.name}-{self.advertise_address}-{self.port}"

    def with_port(self, port: int) -> ServiceSettings:
        return replace(self, port=port)
