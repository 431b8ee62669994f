"""Gateway settings, read from the environment by ``__main__`` only."""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

from mesh_common.settings import ServiceSettings, SettingsError, env_bool, env_float, env_int, env_str

from . import __version__

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Natively Envoy reaches every gateway over loopback (127.0.0.2, ...).
LOOPBACK: tuple[Network, ...] = (ipaddress.IPv4Network("127.0.0.0/8"), ipaddress.IPv6Network("::1/128"))


@dataclass(frozen=True, slots=True)
class Settings:
    service: ServiceSettings
    redis_url: str
    jwt_issuer: str
    jwt_audience: str
    connect_timeout: float = 0.5
    max_body: int = 1024 * 1024
    expose_upstream: bool = False
    breaker_failures: int = 5
    breaker_recovery: float = 5.0
    rate_limit_ip: int = 6000
    rate_limit_user: int = 1200
    rate_limit_auth: int = 30
    # Routes beyond the published API, as (prefix, service): "/api/v1/echo=bench-echo".
    extra_routes: tuple[tuple[str, str], ...] = ()
    # Proxying only (no JWT, rate limit or breakers): the baseline that
    # benchmarks compare the full gateway with. Never for real traffic.
    passthrough: bool = False
    # Peers whose X-Forwarded-For is believed (its last entry is the client):
    # the edge proxy's addresses. Anyone else could forge it per request and
    # slip out of per-IP limits, so for them the TCP peer is the client.
    trusted_proxies: tuple[Network, ...] = LOOPBACK

    def __post_init__(self) -> None:
        if self.breaker_failures < 1 or not self.breaker_recovery > 0:
            raise SettingsError("GATEWAY_BREAKER_FAILURES must be at least 1 and GATEWAY_BREAKER_RECOVERY above 0")
        # Each of these at 0 would pass for a setting and break the gateway
        # quietly: aiohttp reads a body limit of 0 as none at all; a connect
        # deadline of 0 times out every connection, and the breakers open on
        # healthy instances; a limit of 0 refuses every request.
        if not 0 < self.connect_timeout < math.inf:
            raise SettingsError(
                f"GATEWAY_CONNECT_TIMEOUT must be a number of seconds above 0, got {self.connect_timeout}"
            )
        if self.max_body < 1:
            raise SettingsError(f"GATEWAY_MAX_BODY must be at least 1 (bytes), got {self.max_body}")
        limits = {
            "RATE_LIMIT_PER_IP": self.rate_limit_ip,
            "RATE_LIMIT_PER_USER": self.rate_limit_user,
            "RATE_LIMIT_AUTH_PER_IP": self.rate_limit_auth,
        }
        for name, limit in limits.items():
            if limit < 1:
                raise SettingsError(f"{name} must be at least 1 (requests a window), got {limit}")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        return cls(
            service=ServiceSettings.from_env(
                env, name=env_str(env, "GATEWAY_SERVICE_NAME", "gateway"), version=__version__, default_port=8000
            ),
            redis_url=env_str(env, "REDIS_URL"),
            jwt_issuer=env_str(env, "JWT_ISSUER", "todo-mesh"),
            jwt_audience=env_str(env, "JWT_AUDIENCE", "todo-mesh-api"),
            connect_timeout=env_float(env, "GATEWAY_CONNECT_TIMEOUT", 0.5),
            max_body=env_int(env, "GATEWAY_MAX_BODY", 1024 * 1024),
            expose_upstream=env_bool(env, "GATEWAY_EXPOSE_UPSTREAM", False),
            breaker_failures=env_int(env, "GATEWAY_BREAKER_FAILURES", 5),
            breaker_recovery=env_float(env, "GATEWAY_BREAKER_RECOVERY", 5.0),
            rate_limit_ip=env_int(env, "RATE_LIMIT_PER_IP", 6000),
            rate_limit_user=env_int(env, "RATE_LIMIT_PER_USER", 1200),
            rate_limit_auth=env_int(env, "RATE_LIMIT_AUTH_PER_IP", 30),
            extra_routes=_routes(env_str(env, "GATEWAY_EXTRA_ROUTES", "")),
            passthrough=env_bool(env, "GATEWAY_PASSTHROUGH", False),
            trusted_proxies=networks(env_str(env, "GATEWAY_TRUSTED_PROXIES", ",".join(map(str, LOOPBACK)))),
        )

    def with_port(self, port: int) -> Settings:
        return replace(self, service=self.service.with_port(port))


def _routes(raw: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        prefix, sep, service = item.partition("=")
        if not sep or not prefix.startswith("/") or not service:
            raise SettingsError(f"GATEWAY_EXTRA_ROUTES: expected /prefix=service, got {item!r}")
        pairs.append((prefix, service))
    return tuple(pairs)


def networks(raw: str) -> tuple[Network, ...]:
    """Comma-separated CIDRs (a bare address is a /32 or /128); "none" trusts no proxy."""
    if raw.strip().lower() == "none":
        return ()
    parsed = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        try:
            parsed.append(ipaddress.ip_network(item))
        except ValueError as exc:  # host bits set included: "10.0.0.1/8" is a typo, not a network
            raise SettingsError(f"GATEWAY_TRUSTED_PROXIES: {exc}") from None
    return tuple(parsed)
