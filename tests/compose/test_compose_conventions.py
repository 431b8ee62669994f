"""The project's own conventions for compose.yml, asserted on the raw YAML:
scalable services, healthchecks, pinned images, mounted files and the env-var
contract."""

from __future__ import annotations

import importlib
import ipaddress
import json
import re
from typing import Any

import pytest

from devstack import mesh
from devstack.config import StackConfig
from mesh_gateway import settings as gateway_settings

from .conftest import (
    APPS,
    APPS_BY_NAME,
    EXPECTED_SERVICES,
    INFRA_IMAGES,
    REPO,
    App,
    dockerfile_instructions,
    final_stage,
    load_compose,
    services,
)

COMMON_ENV = {
    "SERVICE_HOST": "0.0.0.0",
    "CONSUL_HTTP_ADDR": "http://consul:8500",
    "LOG_FORMAT": "json",
    "JWT_ISSUER": "todo-mesh",
    "JWT_AUDIENCE": "todo-mesh-api",
}
DATABASES = {
    "user-service": "postgresql://users:users@postgres:5432/users",
    "todo-service": "postgresql://todos:todos@postgres:5432/todos",
    "notification-service": "postgresql://notifications:notifications@postgres:5432/notifications",
}


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def env_of(service: dict[str, Any]) -> dict[str, str]:
    """`environment:` as a dict, whichever of the two compose syntaxes is used."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        out: dict[str, str] = {}
        for item in env:
            key, _, value = str(item).partition("=")
            out[key] = value
        return out
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def bind_mounts() -> list[tuple[str, str]]:
    """(service, host path relative to the repo) for every bind mount."""
    mounts: list[tuple[str, str]] = []
    for name, svc in services().items():
        for vol in svc.get("volumes") or []:
            if isinstance(vol, str):
                source = vol.split(":", 1)[0]
                if not source.startswith((".", "/", "~")):
                    continue  # named volume
            elif vol.get("type") == "bind":
                source = vol["source"]
            else:
                continue
            mounts.append((name, source))
    return mounts


def image_tag(image: str) -> str | None:
    """The tag of an image reference, or None when it has none (digests count as pinned)."""
    if "@sha256:" in image:
        return "@digest"
    last = image.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


# ---------------------------------------------------------------------------
# project conventions (raw YAML)
# ---------------------------------------------------------------------------


def test_no_version_key_and_expected_services() -> None:
    doc = load_compose()
    assert "version" not in doc, "`version:` is obsolete in the compose spec"
    assert set(doc["services"]) == EXPECTED_SERVICES


@pytest.mark.parametrize("app", APPS, ids=repr)
def test_scalable_services_have_no_fixed_identity(app: App) -> None:
    svc = services()[app.name]
    # Replicas of `--scale N` would collide on a host port, a container name
    # or (for Consul instance ids derived from it) a hostname.
    for key in ("ports", "container_name", "hostname"):
        assert key not in svc, f"{app.name} must not set `{key}` (it is scalable)"


@pytest.mark.parametrize("app", APPS, ids=repr)
def test_services_get_as_long_to_stop_as_natively(app: App) -> None:
    from devstack.stack import STOP_GRACE

    # Leave Consul, drain, finish what is in flight, close: killed before
    # that, a consumer's unacked events come back and may be sent twice.
    assert services()[app.name]["stop_grace_period"] == f"{STOP_GRACE:g}s"


@pytest.mark.parametrize("name", ["consul", "postgres", "redis", "rabbitmq", "envoy"])
def test_the_infrastructure_gets_as_long_to_stop_as_natively(name: str) -> None:
    from devstack.stack import STOP_GRACE

    assert services()[name]["stop_grace_period"] == f"{STOP_GRACE:g}s"


def _has_flags(command: list[str], *flags: str) -> bool:
    return any(command[i : i + len(flags)] == list(flags) for i in range(len(command)))


def test_the_infrastructure_runs_with_the_native_stacks_settings() -> None:
    # What scripts/devstack/infra.py and mesh.py pass natively, and the reason for each there.
    svc = services()
    assert _has_flags(svc["redis"]["command"], "--save", "", "--appendonly", "no")
    assert _has_flags(svc["postgres"]["command"], "-c", "timezone=UTC")
    assert _has_flags(svc["postgres"]["command"], "-c", "max_connections=300")
    assert "--locale=C.UTF-8" in svc["postgres"]["environment"]["POSTGRES_INITDB_ARGS"]
    assert _has_flags(svc["envoy"]["command"], "-l", "warn")
    assert _has_flags(svc["envoy"]["command"], "--file-flush-interval-msec", "1000")


def test_rabbitmq_is_the_release_line_the_definitions_come_from() -> None:
    definitions = json.loads((REPO / "rabbitmq" / "definitions.json").read_text())
    line = ".".join(definitions["rabbit_version"].split(".")[:2])
    assert services()["rabbitmq"]["image"] == f"rabbitmq:{line}-management"


@pytest.mark.parametrize("app", APPS, ids=repr)
def test_scalable_services_are_built_from_their_dockerfile(app: App) -> None:
    build = services()[app.name].get("build")
    assert isinstance(build, dict), f"{app.name}: use the long `build:` syntax"
    assert build.get("context") == ".", "build context must be the repo root"
    assert build.get("dockerfile") == f"{app.src}/Dockerfile"
    assert app.dockerfile.is_file()


@pytest.mark.parametrize("name", sorted(EXPECTED_SERVICES))
def test_every_service_has_a_healthcheck(name: str) -> None:
    svc = services()[name]
    hc = svc.get("healthcheck")
    if hc is not None:
        assert not hc.get("disable"), f"{name}: healthcheck disabled"
        test = hc.get("test")
        assert test, f"{name}: healthcheck without test"
        if isinstance(test, list):
            assert test[0] in ("CMD", "CMD-SHELL"), f"{name}: healthcheck test must start with CMD or CMD-SHELL"
            assert len(test) > 1
        return
    # No compose-level healthcheck: the image must bring its own.
    assert name in APPS_BY_NAME, f"{name} uses a third-party image and has no healthcheck"
    stage = final_stage(dockerfile_instructions(APPS_BY_NAME[name].dockerfile))
    checks = [args for kw, args in stage if kw == "HEALTHCHECK"]
    assert checks, f"{name}: neither compose.yml nor its Dockerfile define a healthcheck"
    assert checks[-1].upper() != "NONE"


def test_depends_on_waits_for_healthy_services() -> None:
    svcs = services()
    for name, svc in svcs.items():
        deps = svc.get("depends_on")
        if deps is None:
            continue
        assert isinstance(deps, dict), f"{name}: use the long depends_on syntax with conditions"
        for dep, spec in deps.items():
            assert dep in svcs, f"{name} depends on unknown service {dep}"
            assert (spec or {}).get("condition") == "service_healthy", (
                f"{name} -> {dep}: condition must be service_healthy"
            )


def test_dependency_edges() -> None:
    svcs = services()
    assert set(svcs["envoy"].get("depends_on") or {}) == {"gateway"}
    for app in APPS:
        deps = set(svcs[app.name].get("depends_on") or {})
        assert "consul" in deps, f"{app.name} registers in Consul: must wait for it"
        if "DATABASE_URL" in app.env:
            assert "postgres" in deps
        if "REDIS_URL" in app.env:
            assert "redis" in deps
        if "AMQP_URL" in app.env:
            assert "rabbitmq" in deps
        if "SMTP_HOST" in app.env:
            assert "mailpit" in deps


@pytest.mark.parametrize("name", sorted(EXPECTED_SERVICES))
def test_images_are_official_and_pinned(name: str) -> None:
    svc = services()[name]
    image = svc.get("image")
    if name in INFRA_IMAGES:
        assert image, f"{name}: needs an image"
        repo = image.split("@", 1)[0]
        repo = repo.rsplit(":", 1)[0] if ":" in repo.rsplit("/", 1)[-1] else repo
        assert repo == INFRA_IMAGES[name], f"{name}: expected the official {INFRA_IMAGES[name]} image"
    if image is None:
        assert "build" in svc
        return
    tag = image_tag(image)
    assert tag, f"{name}: image {image!r} has no tag (implicitly :latest)"
    assert "latest" not in tag.lower(), f"{name}: image {image!r} is not pinned"
    assert "$" not in image, f"{name}: image reference must not depend on the environment"


@pytest.mark.parametrize(("service", "source"), bind_mounts(), ids=lambda v: str(v))
def test_mounted_files_exist(service: str, source: str) -> None:
    assert not source.startswith(("/", "~")), f"{service}: bind mount {source} must be repo-relative"
    path = (REPO / source).resolve()
    assert REPO in path.parents, f"{service}: bind mount {source} leaves the repository"
    # A missing source would make Docker create an empty *directory* there.
    assert path.exists(), f"{service}: mounted file {source} does not exist in the repository"


def test_expected_config_files_are_mounted() -> None:
    mounted = {source.removeprefix("./") for _, source in bind_mounts()}
    assert mounted >= {
        "consul/dev.hcl",
        "envoy/envoy.compose.yaml",
        "rabbitmq/rabbitmq.conf",
        "rabbitmq/definitions.json",
        "rabbitmq/enabled_plugins",
        "scripts/postgres/create-databases.sql",
    }


@pytest.mark.parametrize(
    ("name", "data"), [("postgres", "/var/lib/postgresql/data"), ("rabbitmq", "/var/lib/rabbitmq")]
)
def test_stateful_infrastructure_keeps_its_data_in_a_named_volume(name: str, data: str) -> None:
    # An image's anonymous volume is not mounted again after `docker compose
    # down`: RabbitMQ lost its queued events, retries and dead letters so.
    compose = load_compose()
    named = {
        volume.split(":")[0]
        for volume in services()[name].get("volumes", [])
        if volume.split(":")[1] == data and not volume.startswith((".", "/"))
    }
    assert named and named <= set(compose["volumes"])


def test_only_infrastructure_uis_and_the_edge_are_published() -> None:
    published = {name: svc["ports"] for name, svc in services().items() if svc.get("ports")}
    assert set(published) == {"consul", "envoy", "rabbitmq", "mailpit"}
    # On loopback by default, as natively: nothing outside the machine reaches the mesh.
    host_addresses = {name: {_interpolated(p).split(":")[0] for p in ports} for name, ports in published.items()}
    assert host_addresses == {name: {"127.0.0.1"} for name in published}
    container_ports = {name: {str(p).rsplit(":", 1)[-1] for p in ports} for name, ports in published.items()}
    assert container_ports == {
        "consul": {"8500"},
        "envoy": {"8080"},
        "rabbitmq": {"15672"},
        "mailpit": {"8025"},
    }


@pytest.mark.parametrize("app", APPS, ids=repr)
def test_service_environment_contract(app: App) -> None:
    env = env_of(services()[app.name])
    for key, value in COMMON_ENV.items():
        assert env.get(key) == value, f"{app.name}: {key}"
    assert env.get("SERVICE_PORT") == str(app.port)
    # In containers the service detects its own IP; a fixed value would make
    # every replica advertise the same address.
    assert "SERVICE_ADVERTISE_ADDRESS" not in env
    for key in app.env:
        assert env.get(key), f"{app.name}: {key} missing"
    if app.name in DATABASES:
        assert env["DATABASE_URL"] == DATABASES[app.name]
    else:
        assert "DATABASE_URL" not in env
    if "REDIS_URL" in app.env:
        assert env["REDIS_URL"] == "redis://redis:6379/0"
    else:
        assert "REDIS_URL" not in env
    if "AMQP_URL" in app.env:
        assert env["AMQP_URL"] == "amqp://guest:guest@rabbitmq:5672/"
    else:
        assert "AMQP_URL" not in env
    if "SMTP_HOST" in app.env:
        assert (env["SMTP_HOST"], env["SMTP_PORT"]) == ("mailpit", "1025")


_DEFAULTED = re.compile(r"\$\{(\w+):-([^}]*)\}")
_REQUIRED = re.compile(r"\$\{(\w+):\?[^}]*\}")
# What `task up` sets for compose's required variables.
TASK_UP_SETS = {"NOTIFICATION_CLIENT_SECRET": "a-secret-of-sixteen-or-more"}


def _interpolated(value: object) -> str:
    defaulted = _DEFAULTED.sub(lambda m: m.group(2), str(value))
    return _REQUIRED.sub(lambda m: TASK_UP_SETS[m.group(1)], defaulted)


@pytest.mark.parametrize(
    ("service", "settings_path"),
    [
        ("user-service", "user_service.settings"),
        ("todo-service", "todo_service.settings"),
        ("notification-service", "notification_service.settings"),
        ("gateway", "mesh_gateway.settings"),
    ],
)
def test_each_service_starts_from_its_compose_environment(service: str, settings_path: str) -> None:
    """Every setting a service requires is given in compose.yml, as natively."""
    env = {k: _interpolated(v) for k, v in env_of(services()[service]).items()}
    settings = importlib.import_module(settings_path).Settings.from_env(env)
    assert settings.service.port == int(env["SERVICE_PORT"])


def test_compose_trusts_envoys_address_and_no_other_container() -> None:
    compose = load_compose()
    (ipam,) = compose["networks"]["default"]["ipam"]["config"]
    subnet, dynamic = ipaddress.ip_network(ipam["subnet"]), ipaddress.ip_network(ipam["ip_range"])
    envoy = ipaddress.ip_address(compose["services"]["envoy"]["networks"]["default"]["ipv4_address"])
    env = {name: _interpolated(value) for name, value in env_of(compose["services"]["gateway"]).items()}
    trusted = gateway_settings.Settings.from_env(env).trusted_proxies

    assert envoy in subnet and envoy not in dynamic
    assert any(envoy in network for network in trusted)
    # Every other container gets its address from the dynamic range: none may be trusted.
    assert not any(network.overlaps(dynamic) for network in trusted if network.version == dynamic.version)


def test_the_gateway_names_the_instance_that_answered_as_natively() -> None:
    native = mesh.gateway(StackConfig.from_env({}), 1).env
    compose = env_of(services()["gateway"])
    assert _interpolated(compose["GATEWAY_EXPOSE_UPSTREAM"]) == native["GATEWAY_EXPOSE_UPSTREAM"] == "1"
