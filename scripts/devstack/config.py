"""Where the native stack lives and listens.

Every port can be overridden from the environment (``MESH_PORT_<NAME>``).
Tests use their own profile, so that a developer's stack and a test run can
run side by side.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from .procs import StackError

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("user", "todo", "notification")
SERVICE_PACKAGES = {"user": "user_service", "todo": "todo_service", "notification": "notification_service"}
CONSUL_NAMES = {"user": "user-service", "todo": "todo-service", "notification": "notification-service"}
# Each service's own database, named for its role too; a service without one is not listed.
DATABASES = {"user": "users", "todo": "todos", "notification": "notifications"}


def port_variable(name: str) -> str:
    """The variable that moves a port: ``consul_serf_lan`` or ``consul serf lan`` -> MESH_PORT_CONSUL_SERF_LAN."""
    return "MESH_PORT_" + name.upper().replace(" ", "_")


def _env_number(env: Mapping[str, str], name: str, lowest: int, highest: int | None = None) -> int | None:
    """``name``'s whole number, from ``lowest`` (to ``highest``); None when it is unset or empty."""
    raw = env.get(name)
    if not raw:
        return None
    bounds = f"from {lowest} to {highest}" if highest is not None else f"of {lowest} or more"
    refused = StackError(f"{name} must be a whole number {bounds}, got {raw!r}")
    try:
        value = int(raw)
    except ValueError:
        raise refused from None
    if value < lowest or (highest is not None and value > highest):
        raise refused
    return value


@dataclass(frozen=True)
class Ports:
    envoy: int = 8080
    envoy_admin: int = 9901
    gateway: int = 8000
    consul_http: int = 8500
    consul_dns: int = 8600
    consul_serf_lan: int = 8301
    consul_serf_wan: int = 8302
    consul_server: int = 8300
    postgres: int = 5432
    redis: int = 6379
    amqp: int = 5672
    rabbitmq_management: int = 15672
    rabbitmq_dist: int = 25672
    epmd: int = 4370
    smtp: int = 1025
    mail_api: int = 8025

    def overridden(self, env: Mapping[str, str]) -> Ports:
        changes = {}
        for f in fields(self):
            # 0 too: a test's Envoy takes the port the kernel chose, and reads it back.
            port = _env_number(env, port_variable(f.name), 0, 65535)
            if port is not None:
                changes[f.name] = port
        return replace(self, **changes)


# A separate block for test runs: below the kernel's ephemeral range
# (32768+), and clear of every default above.
TEST_PORTS = Ports(
    envoy=18080,
    envoy_admin=19901,
    gateway=18000,
    consul_http=18500,
    consul_dns=18600,
    consul_serf_lan=18301,
    consul_serf_wan=18302,
    consul_server=18300,
    postgres=15432,
    redis=16379,
    amqp=15673,
    rabbitmq_management=25673,
    rabbitmq_dist=25674,
    epmd=14370,
    smtp=11025,
    mail_api=18025,
)


@dataclass(frozen=True)
class StackConfig:
    name: str
    run_dir: Path
    ports: Ports
    instances: dict[str, int] = field(default_factory=lambda: {"user": 1, "todo": 1, "notification": 1, "gateway": 1})
    python: str = str(ROOT / ".venv" / "bin" / "python")
    # Whose count no variable gave (`task up` without TODO=): `up` keeps as
    # many as run, and ``instances`` (1) is for where none does. Set back to
    # one, a `task scale SERVICE=todo N=3` was quietly undone by the next `up`.
    counts_unset: frozenset[str] = frozenset()

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, *, profile: str = "dev") -> StackConfig:
        base = TEST_PORTS if profile == "test" else Ports()
        counts = {"user": 1, "todo": 1, "notification": 1, "gateway": 1}
        unset = set()
        for svc in counts:
            count = _env_number(env, f"MESH_{svc.upper()}_INSTANCES", 0)
            if count is None:
                unset.add(svc)
            else:
                counts[svc] = count
        # A folder per profile under MESH_RUN_DIR too: shared, `task test`
        # would take the dev stack's pid files for its own, and stop it.
        # Absolute: the stack's helpers run in "/" (procs.run_checked), and
        # a relative one made `initdb -D run/dev/...` there.
        run_dir = Path(env.get("MESH_RUN_DIR", ROOT / "run")).absolute() / profile
        ports = base.overridden(env)
        return cls(name=profile, run_dir=run_dir, ports=ports, instances=counts, counts_unset=frozenset(unset))

    # -- where things are -------------------------------------------------
    @property
    def consul_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.consul_http}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.envoy}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.ports.redis}/0"

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.ports.amqp}/"

    @property
    def mail_api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.mail_api}"

    def database_url(self, service: str) -> str:
        db = DATABASES[service]
        return f"postgresql://{db}:{db}@127.0.0.1:{self.ports.postgres}/{db}"

    def gateway_address(self, n: int) -> str:
        # Gateways share one port on distinct loopback addresses, so that
        # Consul's DNS A records are all Envoy needs.
        return f"127.0.0.{n + 2}"

    def service_secret(self) -> str:
        """The notification-service's client secret at the user-service, made once per stack."""
        path = self.run_dir / "service-client-secret"
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and not path.read_text().strip():
            path.unlink()  # left empty by a start that died writing it
        if not path.exists():
            # Written whole beside it, then linked into place: a reader never
            # sees it half-written, and when two starts race, both use the
            # first one linked.
            draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
            fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as secret:
                secret.write(secrets.token_urlsafe(32))
            try:
                os.link(draft, path)
            except FileExistsError:
                pass
            finally:
                draft.unlink()
        return path.read_text().strip()

    def service_env(self, service: str) -> dict[str, str]:
        """The environment a service instance gets: the same names as in compose.yml."""
        env = {
            "SERVICE_HOST": "127.0.0.1",
            "SERVICE_PORT": "0",
            "CONSUL_HTTP_ADDR": self.consul_url,
            "LOG_FORMAT": "json",
            "REDIS_URL": self.redis_url,
            "AMQP_URL": self.amqp_url,
            "JWT_ISSUER": "todo-mesh",
            "JWT_AUDIENCE": "todo-mesh-api",
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(self.ports.smtp),
            "MAIL_FROM": "todo-mesh <no-reply@todo-mesh.local>",
        }
        if service in DATABASES:
            env["DATABASE_URL"] = self.database_url(service)
        # The client secret only where compose.yml gives it: to the
        # notification-service, and to the user-service that checks it.
        if service == "user":
            env["SERVICE_CLIENTS"] = f"notification-service:{self.service_secret()}"
        if service == "notification":
            env["SERVICE_CLIENT_SECRET"] = self.service_secret()
        return env
