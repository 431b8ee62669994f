"""todo-service settings, read from the environment by ``__main__`` only."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from mesh_common.pruning import DAY, PruneSettings
from mesh_common.settings import ServiceSettings, SettingsError, env_int, env_str

from . import __version__


@dataclass(frozen=True, slots=True)
class Settings:
    service: ServiceSettings
    database_url: str
    amqp_url: str
    jwt_issuer: str = "todo-mesh"
    jwt_audience: str = "todo-mesh-api"
    # The Consul name owners' profiles (and the JWKS) are fetched from.
    user_service: str = "user-service"
    # A retry with the same Idempotency-Key is answered from the stored
    # response for at least this long; afterwards the key is deleted.
    idempotency_key_ttl: int = DAY
    prune: PruneSettings = field(default_factory=PruneSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        return cls(
            service=ServiceSettings.from_env(env, name="todo-service", version=__version__),
            database_url=env_str(env, "DATABASE_URL"),
            amqp_url=env_str(env, "AMQP_URL"),
            jwt_issuer=env_str(env, "JWT_ISSUER", "todo-mesh"),
            jwt_audience=env_str(env, "JWT_AUDIENCE", "todo-mesh-api"),
            user_service=env_str(env, "USER_SERVICE_NAME", "user-service"),
            idempotency_key_ttl=env_int(env, "IDEMPOTENCY_KEY_TTL", DAY),
            prune=PruneSettings.from_env(env),
        )

    def __post_init__(self) -> None:
        if self.idempotency_key_ttl < 1:
            raise SettingsError("IDEMPOTENCY_KEY_TTL must be positive")

    def with_port(self, port: int) -> Settings:
        return replace(self, service=self.service.with_port(port))
