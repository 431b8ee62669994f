"""Static validation of compose.yml, the service Dockerfiles and .dockerignore.

There is no Docker engine (and no compose plugin) on the dev and CI machines,
so the stack can never be started here. Instead:

* ``scripts/compose-check`` (Go, built on compose-spec/compose-go/v2, the
  loader ``docker compose`` itself uses) loads compose.yml with compose-spec
  schema validation and consistency checks. It is built once per source
  revision into a cache directory outside the repository and reused.
* The project's own conventions (scalable services, healthchecks, pinned
  images, mounted files, the env-var contract, Dockerfile shape) are asserted
  on the raw YAML/Dockerfile text.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "compose.yml"
CHECKER_SRC = REPO / "scripts" / "compose-check"
# Everything that determines the checker binary; their hash names the cached
# binary so an edit (or a compose-go bump in go.mod/go.sum) forces a rebuild.
CHECKER_INPUTS = ("go.mod", "go.sum", "main.go")
CHECKER_BUILD_TIMEOUT = 900  # seconds; a cold build downloads modules
CACHE_PRUNE_AGE = 14 * 24 * 3600  # drop binaries of old revisions after 2 weeks

INFRA_IMAGES = {
    # service -> official image repository (tag checked separately)
    "consul": "hashicorp/consul",
    "envoy": "envoyproxy/envoy",
    "rabbitmq": "rabbitmq",
    "postgres": "postgres",
    "redis": "redis",
    "mailpit": "axllent/mailpit",
}


class App:
    """One of the Python services built from this repository."""

    def __init__(self, name: str, src: str, package: str, port: int, env: set[str]) -> None:
        self.name = name
        self.src = src  # project directory, relative to the repo root
        self.package = package
        self.port = port
        self.env = env  # env vars this service must receive beyond the common ones

    @property
    def dockerfile(self) -> Path:
        return REPO / self.src / "Dockerfile"

    def __repr__(self) -> str:  # used in parametrize ids
        return self.name


APPS = [
    App("user-service", "services/user", "user_service", 8080, {"DATABASE_URL", "REDIS_URL", "AMQP_URL"}),
    App("todo-service", "services/todo", "todo_service", 8080, {"DATABASE_URL", "AMQP_URL"}),
    App(
        "notification-service",
        "services/notification",
        "notification_service",
        8080,
        {"DATABASE_URL", "REDIS_URL", "AMQP_URL", "SMTP_HOST", "SMTP_PORT", "MAIL_FROM"},
    ),
    App("gateway", "gateway", "mesh_gateway", 8000, {"REDIS_URL"}),
]
APPS_BY_NAME = {app.name: app for app in APPS}
EXPECTED_SERVICES = set(INFRA_IMAGES) | set(APPS_BY_NAME)

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


def image_tag(image: str) -> str | None:
    """The tag of an image reference, or None when it has none (digests count as pinned)."""
    if "@sha256:" in image:
        return "@digest"
    last = image.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


# ---------------------------------------------------------------------------
# the checker binary
# ---------------------------------------------------------------------------


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "todo-mesh" / "compose-check"


def _prune_stale(cache: Path, keep: Path) -> None:
    cutoff = time.time() - CACHE_PRUNE_AGE
    for old in cache.glob("compose-check-*"):
        if old == keep:
            continue
        try:
            if old.stat().st_mtime < cutoff:
                old.unlink()
        except OSError:
            pass  # another session may be pruning too


@pytest.fixture(scope="session")
def compose_check() -> Path:
    """Path to the compose-check binary, built once per source revision."""
    go = shutil.which("go")
    if go is None:
        pytest.fail(
            "the Go toolchain (`go`, >= 1.24) is required to build scripts/compose-check, "
            "which validates compose.yml against the compose-spec schema; install Go and "
            "make sure `go` is on PATH. This test is never skipped.",
            pytrace=False,
        )

    digest = hashlib.sha256()
    for name in CHECKER_INPUTS:
        digest.update(name.encode() + b"\0" + (CHECKER_SRC / name).read_bytes() + b"\0")
    cache = _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    binary = cache / f"compose-check-{digest.hexdigest()[:16]}"

    if os.access(binary, os.X_OK):
        os.utime(binary)  # mark as in use, see _prune_stale
        return binary

    # Build to a private name, then rename: concurrent sessions never see a
    # half-written binary.
    tmp = cache / f".{binary.name}.{os.getpid()}.tmp"
    env = {**os.environ, "CGO_ENABLED": "0"}
    cmd = [go, "build", "-mod=readonly", "-trimpath", "-buildvcs=false", "-o", str(tmp), "."]
    try:
        proc = subprocess.run(
            cmd,
            cwd=CHECKER_SRC,
            env=env,
            capture_output=True,
            text=True,
            timeout=CHECKER_BUILD_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        tmp.unlink(missing_ok=True)
        pytest.fail(f"`{shlex.join(cmd)}` timed out after {CHECKER_BUILD_TIMEOUT}s", pytrace=False)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        pytest.fail(
            f"building scripts/compose-check failed ({shlex.join(cmd)}):\n{proc.stdout}{proc.stderr}",
            pytrace=False,
        )
    os.replace(tmp, binary)
    _prune_stale(cache, binary)
    return binary


def run_checker(binary: Path, compose_file: Path) -> subprocess.CompletedProcess[str]:
    # -strict: loader warnings (obsolete `version:`, unset variables) fail too.
    # -project-directory: relative paths resolve against the repo even for
    # copies written to a temporary directory.
    return subprocess.run(
        [str(binary), "-strict", "-project-directory", str(REPO), str(compose_file)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# ---------------------------------------------------------------------------
# compose-spec validation (compose-go)
# ---------------------------------------------------------------------------


# The first test to request compose_check pays for a cold build (module
# download + compile): allow more than the project-wide per-test timeout.
@pytest.mark.timeout(CHECKER_BUILD_TIMEOUT + 60)
def test_compose_file_is_valid(compose_check: Path) -> None:
    proc = run_checker(compose_check, COMPOSE_FILE)
    assert proc.returncode == 0, f"compose.yml rejected:\n{proc.stderr}"
    assert proc.stderr == ""
    assert set(proc.stdout.split()) == EXPECTED_SERVICES


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        node = doc
        for key in parents:
            node = node[key]
        node[leaf] = value

    return mutate


# (mutation, text the checker's error must contain). The first case is the
# control: the same YAML round-trip without a change must still pass, so the
# other cases fail for the reason they name and not because of the copy.
MUTATIONS: dict[str, tuple[Callable[[dict[str, Any]], None] | None, str]] = {
    "unchanged-copy": (None, ""),
    "unknown-key": (_set("services.redis.healthcheck.intervall", "5s"), "intervall"),
    "unknown-top-level-key": (_set("servics", {}), "servics"),
    "bad-depends-on-condition": (
        _set("services.envoy.depends_on.gateway.condition", "service_ready"),
        "condition",
    ),
    "undefined-dependency": (
        _set("services.gateway.depends_on.cache", {"condition": "service_healthy"}),
        'undefined service "cache"',
    ),
    "undefined-named-volume": (_set("services.redis.volumes", ["redisdata:/data"]), "undefined volume"),
    "wrong-type": (_set("services.redis.healthcheck.retries", "many"), "retries"),
    "obsolete-version-key": (_set("version", "3.9"), "warning"),
}


@pytest.mark.timeout(CHECKER_BUILD_TIMEOUT + 60)
@pytest.mark.parametrize("case", list(MUTATIONS))
def test_checker_rejects_invalid_copies(compose_check: Path, tmp_path: Path, case: str) -> None:
    mutate, expected = MUTATIONS[case]
    doc = copy.deepcopy(load_compose())
    if mutate is not None:
        mutate(doc)
    broken = tmp_path / "compose.yml"
    broken.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")

    proc = run_checker(compose_check, broken)
    if mutate is None:
        assert proc.returncode == 0, proc.stderr
        return
    assert proc.returncode == 1, f"checker accepted the {case} copy:\n{proc.stdout}{proc.stderr}"
    assert expected in proc.stderr


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


def test_only_infrastructure_uis_and_the_edge_are_published() -> None:
    published = {name: svc["ports"] for name, svc in services().items() if svc.get("ports")}
    assert set(published) == {"consul", "envoy", "rabbitmq", "mailpit"}
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
    env = {k: _DEFAULTED.sub(lambda m: m.group(2), str(v)) for k, v in env_of(services()[service]).items()}
    settings = importlib.import_module(settings_path).Settings.from_env(env)
    assert settings.service.port == int(env["SERVICE_PORT"])


# ---------------------------------------------------------------------------
# Dockerfiles and .dockerignore
# ---------------------------------------------------------------------------


@pytest.fixture(params=APPS, ids=repr)
def dockerfile(request: pytest.FixtureRequest) -> Iterator[tuple[App, list[tuple[str, str]]]]:
    app: App = request.param
    assert app.dockerfile.is_file(), f"missing {app.dockerfile.relative_to(REPO)}"
    yield app, dockerfile_instructions(app.dockerfile)


def _resolve_from(args: str, instructions: list[tuple[str, str]]) -> str:
    """Base image of a FROM, with global ARG defaults substituted."""
    defaults: dict[str, str] = {}
    for kw, a in instructions:
        if kw == "FROM":
            break
        if kw == "ARG" and "=" in a:
            key, _, value = a.partition("=")
            defaults[key] = value
    image = args.split()[0]
    return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), image)


def test_dockerfile_is_multi_stage_on_python_slim(dockerfile: tuple[App, list[tuple[str, str]]]) -> None:
    _, instructions = dockerfile
    bases = [_resolve_from(args, instructions) for kw, args in instructions if kw == "FROM"]
    assert len(bases) >= 2, "builder + runtime stages expected"
    assert all(base == "python:3.11-slim" for base in bases), bases


def test_dockerfile_installs_common_and_service_with_constraints(
    dockerfile: tuple[App, list[tuple[str, str]]],
) -> None:
    app, instructions = dockerfile
    runs = " ".join(args for kw, args in instructions if kw == "RUN")
    assert f"pip install -c constraints.txt ./services/common ./{app.src}" in runs
    copies = [args for kw, args in instructions if kw == "COPY"]
    assert any(c.startswith("constraints.txt") for c in copies)
    assert any(c.startswith("services/common") for c in copies)
    assert any(c.startswith(app.src) for c in copies)


def test_dockerfile_runtime_stage(dockerfile: tuple[App, list[tuple[str, str]]]) -> None:
    app, instructions = dockerfile
    stage = final_stage(instructions)
    kws = [kw for kw, _ in stage]

    users = [args for kw, args in stage if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "runtime must not run as root"

    envs = " ".join(args for kw, args in stage if kw == "ENV").split()
    assert "PYTHONUNBUFFERED=1" in envs
    assert f"SERVICE_PORT={app.port}" in envs

    exposes = " ".join(args for kw, args in stage if kw == "EXPOSE").split()
    assert str(app.port) in exposes

    cmds = [args for kw, args in stage if kw == "CMD"]
    assert cmds and yaml.safe_load(cmds[-1]) == ["python", "-m", app.package]
    assert "ENTRYPOINT" not in kws

    checks = [args for kw, args in stage if kw == "HEALTHCHECK"]
    assert checks, "runtime stage needs a HEALTHCHECK"
    probe = checks[-1]
    assert "urllib" in probe and "http://127.0.0.1:" in probe and "/health" in probe
    assert "SERVICE_PORT" in probe, "the probe must follow $SERVICE_PORT"
    # Exec form: the JSON array after CMD must parse.
    exec_form = probe.split(" CMD ", 1)[1]
    assert yaml.safe_load(exec_form)[0] == "python"


def test_dockerignore_keeps_local_state_out() -> None:
    path = REPO / ".dockerignore"
    assert path.is_file()
    patterns = {
        line.strip().rstrip("/")
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    for required in (".venv", "run", ".git", "**/__pycache__", "tests"):
        assert required in patterns, f".dockerignore must exclude {required}"
    # The build needs these in the context.
    for needed in ("constraints.txt", "services", "services/common", "gateway"):
        assert needed not in patterns, f".dockerignore must not exclude {needed}"
