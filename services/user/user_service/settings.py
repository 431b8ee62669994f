"""user-service settings, read from the environment by ``__main__`` only."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from mesh_common.pruning import DAY, PruneSettings
from mesh_common.settings import ServiceSettings, SettingsError, env_float, env_int, env_str

from . import __version__

HOUR = 3600

# OWASP's minimum for argon2id (Password Storage Cheat Sheet): 19 MiB, two
# passes, one lane. Settings may raise these, never lower them.
ARGON2_MIN_TIME_COST = 2
ARGON2_MIN_MEMORY_KIB = 19456


@dataclass(frozen=True, slots=True)
class PasswordPolicy:
    time_cost: int = ARGON2_MIN_TIME_COST
    memory_cost_kib: int = ARGON2_MIN_MEMORY_KIB
    parallelism: int = 1
    workers: int = 1  # threads hashing in parallel; the event loop keeps a core to itself
    # Hashing threads run at this nice level, so that when CPU is short the
    # event loop (every other request) wins it, and logins wait instead.
    nice: int = 19
    # Longest a login or registration waits for a hashing slot before a 503:
    # past that, its caller (the gateway gives up at 5 s) is likely gone,
    # and a queue without a bound only grows under a storm.
    queue_seconds: float = 3.0

    def __post_init__(self) -> None:
        if self.time_cost < ARGON2_MIN_TIME_COST or self.memory_cost_kib < ARGON2_MIN_MEMORY_KIB:
            raise SettingsError("argon2id parameters below the OWASP minimum (t=2, m=19456 KiB) are refused")
        if self.workers < 1 or self.parallelism < 1:
            raise SettingsError("ARGON2_WORKERS and ARGON2_PARALLELISM must be at least 1")
        if not 0 <= self.nice <= 19:
            raise SettingsError("ARGON2_NICE must be a nice level from 0 to 19")
        if not self.queue_seconds > 0:
            raise SettingsError("PASSWORD_QUEUE_SECONDS must be more than 0")


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    issuer: str = "todo-mesh"
    audience: str = "todo-mesh-api"
    access_ttl: int = 600
    refresh_ttl: int = 14 * 24 * 3600
    # A family's absolute lifetime, from its login: however often it is
    # refreshed, a session (and a stolen copy of it) ends after this.
    refresh_session_max: int = 30 * DAY
    # How long a family is kept once its last token expired: nothing in it
    # works any more, but a reported reuse or logout can still be traced.
    refresh_retention: int = 7 * DAY
    service_ttl: int = 300
    # How often an instance re-reads the signing keys, so that a rotation
    # made by another instance (or the CLI) reaches it.
    key_refresh_interval: float = 30.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> TokenPolicy:
        # Apart from Settings: the key commands (rotate-keys, retire-keys)
        # need these, and none of the URLs a serving instance does.
        return cls(
            issuer=env_str(env, "JWT_ISSUER", "todo-mesh"),
            audience=env_str(env, "JWT_AUDIENCE", "todo-mesh-api"),
            access_ttl=env_int(env, "ACCESS_TOKEN_TTL", 600),
            refresh_ttl=env_int(env, "REFRESH_TOKEN_TTL", 14 * 24 * 3600),
            refresh_session_max=env_int(env, "REFRESH_SESSION_MAX_SECONDS", 30 * DAY),
            refresh_retention=env_int(env, "REFRESH_TOKEN_RETENTION_SECONDS", 7 * DAY),
            service_ttl=env_int(env, "SERVICE_TOKEN_TTL", 300),
            key_refresh_interval=env_float(env, "SIGNING_KEY_REFRESH_SECONDS", 30.0),
        )

    def __post_init__(self) -> None:
        # A token of a lifetime of 0 or less is expired when it is issued, and
        # a refresh interval of 0 makes KeyRefresher re-read the key table
        # without a pause. "not 0 < x" refuses a NaN too; an infinite interval
        # would never re-read it.
        for name, seconds in (
            ("ACCESS_TOKEN_TTL", self.access_ttl),
            ("REFRESH_TOKEN_TTL", self.refresh_ttl),
            ("SERVICE_TOKEN_TTL", self.service_ttl),
            ("SIGNING_KEY_REFRESH_SECONDS", self.key_refresh_interval),
        ):
            if not 0 < seconds < math.inf:
                raise SettingsError(f"{name} must be a number of seconds more than 0")
        # A shorter session would quietly make REFRESH_TOKEN_TTL a lie (every
        # token would end with its session), and a family from before the
        # session limit could get a child expiring before its parent, which
        # pruning's batch bound relies on never happening (prune_families).
        if self.refresh_session_max < self.refresh_ttl:
            raise SettingsError("REFRESH_SESSION_MAX_SECONDS must be at least REFRESH_TOKEN_TTL")
        # Shorter, and a prune could race a refresh that began just before
        # its token expired: deleting the spent ancestors cascades to the
        # child that refresh has just issued, and its user is logged out.
        if self.refresh_retention < HOUR:
            raise SettingsError("REFRESH_TOKEN_RETENTION_SECONDS must be at least 3600 (an hour)")


@dataclass(frozen=True, slots=True)
class ThrottlePolicy:
    max_failures: int = 10
    window_seconds: int = 60

    def __post_init__(self) -> None:
        # A window of 0 would let Redis drop every slot at once: guessing
        # without a limit, and nothing said.
        if self.max_failures < 1 or self.window_seconds < 1:
            raise SettingsError("LOGIN_MAX_FAILURES and LOGIN_WINDOW_SECONDS must be at least 1")


@dataclass(frozen=True, slots=True)
class Settings:
    service: ServiceSettings
    database_url: str
    redis_url: str
    amqp_url: str
    db_pool_size: int = 10
    # How many of those connections writes may hold at once (see app.py).
    db_write_slots: int = 3
    tokens: TokenPolicy = TokenPolicy()
    passwords: PasswordPolicy = PasswordPolicy()
    throttle: ThrottlePolicy = ThrottlePolicy()
    prune: PruneSettings = field(default_factory=PruneSettings)
    # name -> secret of the services allowed the client-credentials grant.
    service_clients: tuple[tuple[str, str], ...] = ()
    # Every Redis key this service writes starts with this, so tests (and a
    # shared Redis) can tell its keys apart.
    redis_prefix: str = "user-service:"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        return cls(
            service=ServiceSettings.from_env(env, name="user-service", version=__version__),
            database_url=env_str(env, "DATABASE_URL"),
            redis_url=env_str(env, "REDIS_URL"),
            amqp_url=env_str(env, "AMQP_URL"),
            db_pool_size=env_int(env, "DB_POOL_SIZE", 10),
            db_write_slots=env_int(env, "DB_WRITE_SLOTS", 3),
            tokens=TokenPolicy.from_env(env),
            passwords=PasswordPolicy(
                time_cost=env_int(env, "ARGON2_TIME_COST", ARGON2_MIN_TIME_COST),
                memory_cost_kib=env_int(env, "ARGON2_MEMORY_KIB", ARGON2_MIN_MEMORY_KIB),
                parallelism=env_int(env, "ARGON2_PARALLELISM", 1),
                workers=env_int(env, "ARGON2_WORKERS", 1),
                nice=env_int(env, "ARGON2_NICE", 19),
                queue_seconds=env_float(env, "PASSWORD_QUEUE_SECONDS", 3.0),
            ),
            throttle=ThrottlePolicy(
                max_failures=env_int(env, "LOGIN_MAX_FAILURES", 10),
                window_seconds=env_int(env, "LOGIN_WINDOW_SECONDS", 60),
            ),
            prune=PruneSettings.from_env(env),
            service_clients=parse_service_clients(env.get("SERVICE_CLIENTS", "")),
            redis_prefix=env_str(env, "REDIS_PREFIX", "user-service:"),
        )

    def __post_init__(self) -> None:
        # Outside the write slots: the outbox relay's batch and a pruning
        # batch, one connection each at most; reads keep at least two.
        if not 1 <= self.db_write_slots <= self.db_pool_size - 4:
            raise SettingsError("DB_WRITE_SLOTS must be from 1 to DB_POOL_SIZE - 4")

    def with_port(self, port: int) -> Settings:
        return replace(self, service=self.service.with_port(port))


def parse_service_clients(raw: str) -> tuple[tuple[str, str], ...]:
    """``name:secret,name2:secret2`` -> ((name, secret), ...)."""
    clients = []
    for entry in filter(None, (part.strip() for part in raw.split(","))):
        name, sep, secret = entry.partition(":")
        if not sep or not name or not secret:
            raise SettingsError("SERVICE_CLIENTS must look like name:secret,name2:secret2")
        if len(secret) < 16:
            raise SettingsError(f"SERVICE_CLIENTS: the secret of {name!r} is shorter than 16 characters")
        clients.append((name, secret))
    return tuple(clients)
