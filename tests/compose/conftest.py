"""What the static checks of compose.yml, the service Dockerfiles and .dockerignore share.

There is no Docker engine (and no compose plugin) on the dev and CI machines,
so the stack can never be started here. Instead:

* ``scripts/compose-check`` (Go, built on compose-spec/compose-go/v2, the
  loader ``docker compose`` itself uses) loads compose.yml with compose-spec
  schema validation and consistency checks. It is built once per source
  revision into a cache directory outside the repository and reused
  (test_compose_spec.py).
* The project's own conventions (scalable services, healthchecks, pinned
  images, mounted files, Dockerfile shape) are asserted on the raw
  YAML/Dockerfile text (test_compose_conventions.py, test_dockerfiles.py).
* Each service's environment is compared with the one the native stack gives
  it (scripts/devstack), over the variables the service reads
  (test_compose_environment.py).
* The wheels the images install are built with pip, offline, and checked for
  the migrations and data files the services read (test_wheels.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "compose.yml"

INFRA_IMAGES = {
    # service -> official image repository (tag checked separately)
    "consul": "hashicorp/consul",
    "envoy": "envoyproxy/envoy",
    "rabbitmq": "rabbitmq",
    "postgres": "postgres",
    "postgres-init": "postgres",
    "redis": "redis",
    "mailpit": "axllent/mailpit",
}


class App:
    """One of the Python services built from this repository."""

    def __init__(self, name: str, src: str, package: str, port: int, native: str) -> None:
        self.name = name
        self.src = src  # project directory, relative to the repo root
        self.package = package
        self.port = port
        self.native = native  # its name in the native stack (scripts/devstack)

    @property
    def dockerfile(self) -> Path:
        return REPO / self.src / "Dockerfile"

    def __repr__(self) -> str:  # used in parametrize ids
        return self.name


APPS = [
    App("user-service", "services/user", "user_service", 8080, "user"),
    App("todo-service", "services/todo", "todo_service", 8080, "todo"),
    App("notification-service", "services/notification", "notification_service", 8080, "notification"),
    App("gateway", "gateway", "mesh_gateway", 8000, "gateway"),
]
APPS_BY_NAME = {app.name: app for app in APPS}
# Services that run, do their work and exit: what waits for one waits for it to succeed.
ONE_SHOTS = {"postgres-init"}
EXPECTED_SERVICES = set(INFRA_IMAGES) | set(APPS_BY_NAME)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    with COMPOSE_FILE.open(encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    assert isinstance(data, dict), "compose.yml must be a mapping"
    return data


def services() -> dict[str, dict[str, Any]]:
    return load_compose().get("services") or {}


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


_DEFAULTED = re.compile(r"\$\{(\w+):-([^}]*)\}")
_REQUIRED = re.compile(r"\$\{(\w+):\?[^}]*\}")
# What `task up` sets for compose's required variables.
TASK_UP_SETS = {"NOTIFICATION_CLIENT_SECRET": "a-secret-of-sixteen-or-more"}


def interpolated(value: object) -> str:
    """A value as compose hands it over: defaults taken, and required variables as `task up` sets them."""
    defaulted = _DEFAULTED.sub(lambda m: m.group(2), str(value))
    return _REQUIRED.sub(lambda m: TASK_UP_SETS[m.group(1)], defaulted)


def compose_env(name: str) -> dict[str, str]:
    """The environment compose gives the service ``name``, interpolated."""
    return {key: interpolated(value) for key, value in env_of(services()[name]).items()}


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs; comments dropped, continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            instructions.append((keyword.upper(), " ".join(args.split())))
    assert not pending, f"{path}: dangling line continuation"
    return instructions


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (kw, _) in enumerate(instructions) if kw == "FROM"]
    assert starts, "no FROM instruction"
    return instructions[starts[-1] :]
