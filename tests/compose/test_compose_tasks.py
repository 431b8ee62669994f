"""`task up` and `task scale` on a Docker host: the real go-task, Taskfile.yml and scripts/compose-stack.

Docker cannot run here (no engine; see conftest.py). A fake `docker`, put
first on PATH, stands in for the Docker CLI only: it records each call, its
arguments and the variables compose would read from the shell, answers
`docker info` as the test says, and `docker compose port` with the addresses
the test gives. What is tested is our own logic: which stack a task acts on,
the secret kept in .env, the counts and ports handed to compose.

Each test runs in a copy of the files the tasks read, in a temporary
directory, with a run directory of its own (MESH_RUN_DIR): the real tree's
.env and run/ are never touched. A native dev stack "runs" there as devstack
knows one to: a pid file of a live process (a sleeper), not the real stack.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devstack.procs import Proc, running, start, stop

from .conftest import APPS, REPO

TASK = REPO / ".venv" / "bin" / "task"
TASK_TIMEOUT = 60  # seconds; every docker call is the fake's, answered at once
SECRET_LINE = re.compile(r"NOTIFICATION_CLIENT_SECRET=[0-9a-f]{64}")

FAKE_DOCKER = """#!{python}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_DOCKER_LOG"], "a") as log:
    watched = ("ENVOY_HTTP_PORT", "NOTIFICATION_CLIENT_SECRET")
    log.write(json.dumps({{"argv": ["docker", *args], "env": {{k: os.environ.get(k) for k in watched}}}}) + "\\n")
if args == ["info"]:
    sys.exit(0 if os.environ["FAKE_DOCKER_ENGINE"] == "up" else 1)
if args[:1] == ["compose"] and os.environ.get("FAKE_DOCKER_COMPOSE") == "missing":
    sys.exit("docker: 'compose' is not a docker command.")
if args[:2] == ["compose", "down"] and os.environ.get("FAKE_DOCKER_COMPOSE_DOWN") == "fails":
    sys.exit("service redis refused to stop")
if args[:2] == ["compose", "port"]:
    print(json.loads(os.environ.get("FAKE_DOCKER_PORTS", "{{}}")).get(" ".join(args[2:]), "127.0.0.1:" + args[3]))
"""

# Taskfile's DEVSTACK, for `scale`'s native branch only: it records the call
# instead of scaling a stack that is a sleeper. scripts/compose-stack still
# asks the real devstack (`status`) whether the native stack runs.
FAKE_DEVSTACK = """#!{python}
import json, os, sys
with open(os.environ["FAKE_DOCKER_LOG"], "a") as log:
    log.write(json.dumps({{"argv": ["devstack", *sys.argv[1:]], "env": {{}}}}) + "\\n")
sys.exit(os.environ.get("FAKE_DEVSTACK") == "refuses")  # as it does while another holds the stack's lock
"""

# Variables of the caller's shell that would change what is tested (go-task
# takes the environment as template variables too: USERS, TODO, SERVICE...).
CLEARED = {"NOTIFICATION_CLIENT_SECRET", "ENVOY_HTTP_PORT", "CONSUL_UI_PORT", "RABBITMQ_UI_PORT", "MAILPIT_UI_PORT"}
CLEARED |= {"EDGE_ADDRESS", "USERS", "TODO", "NOTIFICATION", "GATEWAY", "SERVICE", "N", "DEVSTACK"}


@dataclass(frozen=True)
class Tree:
    root: Path
    run_dir: Path
    log: Path
    bin: Path

    @property
    def dotenv(self) -> Path:
        return self.root / ".env"

    def task(self, *args: str, engine: str = "up", ok: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
        base = {k: v for k, v in os.environ.items() if k not in CLEARED and not k.startswith("MESH_")}
        base |= {
            "PATH": f"{self.bin}:{os.environ['PATH']}",
            "MESH_RUN_DIR": str(self.run_dir),
            "FAKE_DOCKER_LOG": str(self.log),
            "FAKE_DOCKER_ENGINE": engine,
        }
        result = subprocess.run(
            [str(TASK), "--dir", str(self.root), *args],
            env=base | env,
            capture_output=True,
            text=True,
            timeout=TASK_TIMEOUT,
        )
        assert (result.returncode == 0) == ok, result.stdout + result.stderr
        return result

    def calls(self) -> list[dict[str, Any]]:
        """Every docker (and devstack) call so far, and forget them."""
        if not self.log.exists():
            return []
        lines = self.log.read_text().splitlines()
        self.log.unlink()
        return [json.loads(line) for line in lines]


def acting(calls: list[dict[str, Any]]) -> list[list[str]]:
    """The calls that do something: not `docker info` or `docker compose version`, asked to choose."""
    asked = (["docker", "info"], ["docker", "compose", "version"])
    return [call["argv"] for call in calls if call["argv"] not in asked]


def compose_up(calls: list[dict[str, Any]]) -> dict[str, Any]:
    ups = [call for call in calls if call["argv"][:3] == ["docker", "compose", "up"]]
    assert len(ups) == 1, calls
    return ups[0]


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    root = tmp_path / "tree"
    (root / "scripts").mkdir(parents=True)
    for name in ("Taskfile.yml", "compose.yml", "scripts/compose-stack"):
        if (REPO / name).exists():  # no scripts/compose-stack before it was written
            shutil.copy2(REPO / name, root / name)
    shutil.copytree(
        REPO / "scripts" / "devstack", root / "scripts" / "devstack", ignore=shutil.ignore_patterns("__pycache__")
    )
    for mounted in ("consul", "envoy", "rabbitmq", "scripts/postgres"):
        (root / mounted).mkdir()
    (root / ".venv").symlink_to(REPO / ".venv")
    fakes = tmp_path / "bin"
    fakes.mkdir()
    for name, text in (("docker", FAKE_DOCKER), ("devstack", FAKE_DEVSTACK)):
        (fakes / name).write_text(text.format(python=sys.executable))
        (fakes / name).chmod(0o755)
    return Tree(root=root, run_dir=tmp_path / "run", log=tmp_path / "calls.jsonl", bin=fakes)


@pytest.fixture
def native_dev_stack(tree: Tree) -> Iterator[Path]:
    """A native dev stack that runs, as devstack sees it: a live process under its pid file."""
    dev = tree.run_dir / "dev"
    start(dev, Proc("consul", [sys.executable, "-c", "import time; time.sleep(60)"], env={}))
    try:
        yield dev
    finally:
        for name in running(dev):
            stop(dev, name)


def test_the_first_up_keeps_a_secret_of_its_own_in_dotenv_and_starts_the_counts_asked(tree: Tree) -> None:
    # go-task's shell has no umask: `(umask 077 && echo ... >> .env)` failed, and nothing started.
    tree.task("up", "TODO=3", "GATEWAY=2")
    assert SECRET_LINE.fullmatch(tree.dotenv.read_text().rstrip("\n"))
    assert stat.S_IMODE(tree.dotenv.stat().st_mode) == 0o600
    argv = compose_up(tree.calls())["argv"]
    assert argv[:6] == ["docker", "compose", "up", "-d", "--build", "--wait"]
    # Every app, in whatever order the script lists them: one each but those asked for.
    assert scales(argv[6:]) == {app.name: 1 for app in APPS} | {"todo-service": 3, "gateway": 2}


def test_a_count_on_the_command_line_wins_over_one_exported_in_the_shell(tree: Tree) -> None:
    # In the Taskfile's env:, the shell's MESH_TODO_INSTANCES won over TODO=3.
    tree.task("up", "TODO=3", MESH_TODO_INSTANCES="2", MESH_GATEWAY_INSTANCES="2")
    assert scales(compose_up(tree.calls())["argv"][6:]) == {app.name: 1 for app in APPS} | {
        "todo-service": 3,
        "gateway": 2,
    }


def scales(args: list[str]) -> dict[str, int]:
    """``--scale name=n`` pairs, and nothing else, as {name: n}."""
    assert args[::2] == ["--scale"] * (len(args) // 2) and len(args) % 2 == 0, args
    return {name: int(n) for name, _, n in (pair.partition("=") for pair in args[1::2])}


def test_a_second_up_keeps_the_secret_and_one_set_in_the_shell_wins(tree: Tree) -> None:
    tree.task("up")
    first = tree.dotenv.read_text()
    tree.task("up")
    assert tree.dotenv.read_text() == first
    tree.task("up", NOTIFICATION_CLIENT_SECRET="a-secret-of-the-shell-own")
    assert tree.dotenv.read_text() == first


def test_a_dotenv_of_the_users_own_gets_the_secret_on_a_line_of_its_own_and_mode_0600(tree: Tree) -> None:
    tree.dotenv.write_text("CONSUL_UI_PORT=8501")  # no newline at its end
    tree.dotenv.chmod(0o644)
    tree.task("up")
    first, second = tree.dotenv.read_text().splitlines()
    assert first == "CONSUL_UI_PORT=8501"
    assert SECRET_LINE.fullmatch(second)
    assert stat.S_IMODE(tree.dotenv.stat().st_mode) == 0o600


def test_up_leaves_envoys_port_to_dotenv_and_prints_the_ports_compose_published(tree: Tree) -> None:
    # A default exported to compose took precedence over the user's .env.
    tree.dotenv.write_text(f"ENVOY_HTTP_PORT=9090\nNOTIFICATION_CLIENT_SECRET={'s' * 32}\n")
    ports = {"envoy 8080": "127.0.0.1:9090", "consul 8500": "127.0.0.1:8501"}
    ports |= {"mailpit 8025": "127.0.0.1:8026", "rabbitmq 15672": "127.0.0.1:15673"}
    said = tree.task("up", FAKE_DOCKER_PORTS=json.dumps(ports)).stdout
    assert compose_up(tree.calls())["env"]["ENVOY_HTTP_PORT"] is None
    for url in ("127.0.0.1:9090/api/v1", "127.0.0.1:8501/ui/", "127.0.0.1:8026/", "127.0.0.1:15673/"):
        assert f"http://{url}" in said, said
    # The native knob still moves it.
    tree.task("up", MESH_PORT_ENVOY="9191")
    assert compose_up(tree.calls())["env"]["ENVOY_HTTP_PORT"] == "9191"


def test_scale_acts_on_the_native_stack_while_it_runs_and_on_compose_otherwise(
    tree: Tree, native_dev_stack: Path
) -> None:
    # With Docker installed, `task up:native` then `task scale` started
    # compose's containers, without their dependencies, beside the native stack.
    scale = ("scale", "SERVICE=todo", "N=3", f"DEVSTACK={tree.bin / 'devstack'}")
    tree.task(*scale)
    assert acting(tree.calls()) == [["devstack", "scale", "todo", "3"]]

    for name in running(native_dev_stack):
        stop(native_dev_stack, name)
    tree.task(*scale)
    compose = ["docker", "compose", "up", "-d", "--wait", "--no-deps", "--scale", "todo-service=3", "todo-service"]
    assert acting(tree.calls()) == [compose]

    tree.task(*scale, engine="down")
    assert acting(tree.calls()) == [["devstack", "scale", "todo", "3"]]


def test_a_docker_without_compose_leaves_scale_to_the_native_stack(tree: Tree) -> None:
    # Debian's docker.io: `docker info` answers, `docker compose` is no command.
    tree.task("scale", "SERVICE=todo", "N=3", f"DEVSTACK={tree.bin / 'devstack'}", FAKE_DOCKER_COMPOSE="missing")
    assert acting(tree.calls()) == [["devstack", "scale", "todo", "3"]]


def test_down_stops_the_native_stacks_even_when_compose_fails(tree: Tree) -> None:
    down = ("down", f"DEVSTACK={tree.bin / 'devstack'}")
    tree.task(*down, FAKE_DOCKER_COMPOSE="missing")
    natives = [["devstack", "down"], ["devstack", "--profile", "test", "down"]]
    assert acting(tree.calls()) == natives
    # A compose that answers and fails to stop its stack fails the task, and the native ones are stopped all the same.
    tree.task(*down, ok=False, FAKE_DOCKER_COMPOSE_DOWN="fails")
    assert acting(tree.calls()) == [["docker", "compose", "down"], *natives]
    # And a native stack that refuses (its lock held) leaves no other running.
    tree.task(*down, ok=False, FAKE_DEVSTACK="refuses")
    assert acting(tree.calls()) == [["docker", "compose", "down"], *natives]
