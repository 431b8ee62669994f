"""compose.yml gives each service the environment the native stack gives it.

The native stack (scripts/devstack: StackConfig.service_env, and mesh.py for
the gateway) is the one the tests run; compose.yml is the same system in
containers, never started here. So, for each service and over the variables
it reads, compose's environment must be the native one with each address as
the compose network has it, but where DIFFERENCES says otherwise, and why.

Which variables a service reads comes from its code, not from a list kept
here: its settings are built, as its ``__main__`` builds them (the only place
that reads the environment), from an environment that notes each name asked
for.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import pytest

from devstack import mesh
from devstack.config import Ports, StackConfig
from devstack.reads import Reads
from notification_service.settings import Settings as NotificationSettings
from user_service.settings import parse_service_clients

from .conftest import APPS, App, compose_env

# Where compose differs from the native stack on purpose, and why. The compose
# side of each is checked on its own: below, or in the test named.
DIFFERENCES = {
    "SERVICE_HOST": "natively loopback (a gateway, its own 127.0.0.N); in a container every interface (0.0.0.0),"
    " for the other containers, and an instance registers its container's address",
    "SERVICE_PORT": "natively 0, a free port per instance (the gateways share one, each on its own address); in"
    " a container a fixed one (8080, the gateway 8000), which its image's HEALTHCHECK and Envoy use",
    "GATEWAY_TRUSTED_PROXIES": "natively Envoy is on loopback, the default; in compose it is Envoy's fixed address"
    " (test_compose_conventions.py, test_compose_trusts_envoys_address_and_no_other_container)",
    "SERVICE_CLIENTS": "the notification-service's secret: natively made per stack, in its run dir; in compose"
    " NOTIFICATION_CLIENT_SECRET, from .env (test_the_notification_service_is_the_user_services_one_client)",
    "SERVICE_CLIENT_SECRET": "the same secret, on the notification-service's side",
}

# Where each native listener (a field of Ports, on 127.0.0.1) is on the compose network.
COMPOSE_ADDRESSES = {
    "consul_http": ("consul", 8500),
    "postgres": ("postgres", 5432),
    "redis": ("redis", 6379),
    "amqp": ("rabbitmq", 5672),
    "smtp": ("mailpit", 1025),
}


def settings_of(app: App, env: Mapping[str, str]) -> Any:
    return importlib.import_module(f"{app.package}.settings").Settings.from_env(env)


def read_by(app: App, env: Mapping[str, str]) -> set[str]:
    """The variables ``app`` reads as it starts with ``env``."""
    reads = Reads(env)
    settings_of(app, reads)
    return reads.names


def native_env(cfg: StackConfig, app: App) -> dict[str, str]:
    """What the native stack starts the first instance of ``app`` with."""
    proc = mesh.gateway(cfg, 0) if app.native == "gateway" else mesh.service(cfg, app.native, 0)
    return dict(proc.env)


def on_the_compose_network(env: Mapping[str, str], ports: Ports) -> dict[str, str]:
    """``env`` with each native address (127.0.0.1 and a port of ``ports``) as compose has it."""
    moved = {}
    for name, value in env.items():
        for listener, (host, port) in COMPOSE_ADDRESSES.items():
            value = value.replace(f"127.0.0.1:{getattr(ports, listener)}", f"{host}:{port}")
        moved[name] = value
    # SMTP's address is two variables.
    host, port = COMPOSE_ADDRESSES["smtp"]
    if (moved.get("SMTP_HOST"), moved.get("SMTP_PORT")) == ("127.0.0.1", str(ports.smtp)):
        moved |= {"SMTP_HOST": host, "SMTP_PORT": str(port)}
    return moved


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> StackConfig:
    """The native stack as a bare `task up` configures it; its run dir (the client secret's) apart."""
    return StackConfig.from_env({"MESH_RUN_DIR": str(tmp_path_factory.mktemp("run"))})


@pytest.mark.parametrize("app", APPS, ids=repr)
def test_compose_gives_each_service_what_the_native_stack_does(app: App, native: StackConfig) -> None:
    natively = native_env(native, app)
    compose = compose_env(app.name)
    read = read_by(app, natively)
    # Nothing the service never reads: a misspelt name, say, would pass for set.
    assert compose.keys() <= read, f"{app.name} never reads {sorted(compose.keys() - read)}"
    alike = read - DIFFERENCES.keys()
    expected = {name: value for name, value in on_the_compose_network(natively, native.ports).items() if name in alike}
    assert {name: value for name, value in compose.items() if name in alike} == expected


def test_every_difference_listed_is_one(native: StackConfig) -> None:
    differing: set[str] = set()
    for app in APPS:
        natively = on_the_compose_network(native_env(native, app), native.ports)
        compose = compose_env(app.name)
        differing |= {name for name in read_by(app, natively) if compose.get(name) != natively.get(name)}
    assert not DIFFERENCES.keys() - differing, "listed as a difference, and the same in both stacks"


@pytest.mark.parametrize("app", APPS, ids=repr)
def test_each_service_starts_from_its_compose_environment_on_every_interface(app: App) -> None:
    # Reached from the other containers, on the port its image's HEALTHCHECK probes.
    settings = settings_of(app, compose_env(app.name))
    assert (settings.service.host, settings.service.port) == ("0.0.0.0", app.port)


@pytest.mark.parametrize("stack", ["native", "compose"])
def test_the_notification_service_is_the_user_services_one_client(stack: str, native: StackConfig) -> None:
    env = {app.native: native_env(native, app) if stack == "native" else compose_env(app.name) for app in APPS}
    notification = NotificationSettings.from_env(env["notification"])
    clients = parse_service_clients(env["user"]["SERVICE_CLIENTS"])
    assert clients == ((notification.client_id, notification.client_secret),)


@pytest.mark.parametrize("app", APPS, ids=repr)
def test_the_client_secret_reaches_the_same_services_in_both_stacks(app: App, native: StackConfig) -> None:
    # Only the notification-service and the user-service that checks it hold it.
    secrets = {"SERVICE_CLIENTS", "SERVICE_CLIENT_SECRET"}
    assert native_env(native, app).keys() & secrets == compose_env(app.name).keys() & secrets
