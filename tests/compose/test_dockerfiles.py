"""The service Dockerfiles and .dockerignore, asserted on their raw text."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import yaml

from .conftest import APPS, REPO, App, dockerfile_instructions, final_stage

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
