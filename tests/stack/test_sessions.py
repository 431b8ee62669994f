"""Test runs that share one test stack: each start's parts once, stops nothing under another, cleans up alone."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from devstack import cli, infra, lock, rabbitmq, sessions, stack
from devstack.config import ROOT, Ports, StackConfig, port_variable
from devstack.procs import Proc, running, start, stop

from .conftest import sleeper, unused_port

INFRA = set(stack.INFRA)
LEFT_BY_A_KILLED_RUN = ("envoy", "gateway-0", "todo-0", "notification-0", "bench-echo")

# A test session in a process of its own, its infrastructure stand-ins: it
# says when it has joined, then holds on until its stdin closes.
SESSION = """
import sys
from devstack import infra, rabbitmq, sessions, stack
from devstack.config import StackConfig
from devstack.procs import Proc

def stand_in(name):
    return Proc(name, [sys.executable, "-c", "import time; time.sleep(60)"], env={})

for part in ("consul", "postgres", "redis", "mailsink"):
    setattr(infra, part, lambda cfg, name=part: stand_in(name))
rabbitmq.server = lambda cfg: stand_in("rabbitmq")
infra.create_databases = lambda cfg: None
stack.ready = lambda *args, **kwargs: None
with sessions.session(StackConfig.from_env(profile="test")):
    print("joined", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A test stack of its own: its run directory, and ports nothing holds (the shared test stack's are taken)."""
    return {
        "MESH_RUN_DIR": str(tmp_path),
        **{port_variable(f.name): str(unused_port()) for f in fields(Ports)},
    }


@pytest.fixture
def cfg(env: dict[str, str]) -> Iterator[StackConfig]:
    cfg = StackConfig.from_env(env, profile="test")
    yield cfg
    for name in running(cfg.run_dir):
        stop(cfg.run_dir, name)


@pytest.fixture
def stand_ins(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The infrastructure's parts as stand-ins, ready at once: the names of those started, in order."""
    started: list[str] = []

    def part(name: str) -> Proc:
        started.append(name)
        return sleeper(name)

    for module, name in ((infra, "consul"), (infra, "postgres"), (infra, "redis"), (infra, "mailsink")):
        monkeypatch.setattr(module, name, lambda cfg, name=name: part(name))
    monkeypatch.setattr(rabbitmq, "server", lambda cfg: part("rabbitmq"))
    monkeypatch.setattr(infra, "create_databases", lambda cfg: None)
    monkeypatch.setattr(stack, "ready", lambda *args, **kwargs: None)
    return started


@contextlib.contextmanager
def other_session(env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    """Another test run's session, joined, for the block (or until the test kills it)."""
    child = subprocess.Popen(
        [sys.executable, "-c", SESSION],
        env={**os.environ, **env, "PYTHONPATH": str(ROOT / "scripts")},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "joined\n", child.stderr.read() if child.stderr else ""
        yield child
    finally:
        child.kill()
        child.communicate(timeout=30)


def test_a_run_that_ends_leaves_the_stack_to_another_still_running(env: dict[str, str], cfg: StackConfig) -> None:
    # `task test`'s end stopped the stack under another run's remaining tests: connection refused.
    with other_session(env) as other:
        parts = running(cfg.run_dir)
        assert set(parts) == INFRA
        with lock.held(cfg.run_dir, "down"), pytest.raises(stack.InUse, match=f"still use it \\(pid {other.pid}\\)"):
            stack.down(cfg, unless_in_use=True)
        assert running(cfg.run_dir) == parts
        # Killed outright, it uses the stack no more: the next end stops it.
        other.send_signal(signal.SIGKILL)
        other.wait(timeout=30)
        with lock.held(cfg.run_dir, "down"):
            assert set(stack.down(cfg, unless_in_use=True)) == INFRA
    assert running(cfg.run_dir) == {}


def test_a_down_typed_by_hand_stops_the_stack_whoever_uses_it(env: dict[str, str], cfg: StackConfig) -> None:
    with other_session(env):
        with lock.held(cfg.run_dir, "down"):
            assert set(stack.down(cfg)) == INFRA
        assert running(cfg.run_dir) == {}


def test_runs_that_start_at_once_start_each_part_once(
    cfg: StackConfig, stand_ins: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both found the ports free and both started Consul and PostgreSQL; the
    # second's pid files hid the first's processes from `down` for good.
    both_there = threading.Barrier(2, timeout=2)
    real_consul = infra.consul

    def consul(cfg: StackConfig) -> Proc:
        # The other start, if it can get this far too, gets here meanwhile.
        with contextlib.suppress(threading.BrokenBarrierError):
            both_there.wait()
        return real_consul(cfg)

    monkeypatch.setattr(infra, "consul", consul)
    outcomes: list[BaseException | None] = []

    def run() -> None:
        try:
            with sessions.session(cfg):
                outcomes.append(None)
        except BaseException as exc:
            outcomes.append(exc)

    runs = [threading.Thread(target=run) for _ in range(2)]
    for one in runs:
        one.start()
    for one in runs:
        one.join(timeout=60)
    assert outcomes == [None, None]
    assert sorted(stand_ins) == sorted(INFRA)
    assert set(running(cfg.run_dir)) == INFRA


def _leave_running(cfg: StackConfig, names: tuple[str, ...]) -> dict[str, int]:
    for name in names:
        start(cfg.run_dir, sleeper(name))
    return running(cfg.run_dir)


def test_the_only_run_stops_the_services_a_killed_one_left_and_keeps_the_infrastructure(
    cfg: StackConfig, stand_ins: list[str]
) -> None:
    # A todo-service left running by a killed `task test` published, from its
    # relay, the rows the next run's unit suites wrote to its outbox.
    before = _leave_running(cfg, (*stack.INFRA, *LEFT_BY_A_KILLED_RUN))
    with sessions.session(cfg):
        assert running(cfg.run_dir) == {name: pid for name, pid in before.items() if name in INFRA}
    assert stand_ins == []


def test_a_run_beside_another_leaves_that_ones_services_running(
    env: dict[str, str], cfg: StackConfig, stand_ins: list[str]
) -> None:
    with other_session(env):
        before = _leave_running(cfg, LEFT_BY_A_KILLED_RUN)  # as its end-to-end tests have them
        with sessions.session(cfg):
            assert running(cfg.run_dir) == before
    assert stand_ins == []


def test_end_to_end_tests_that_end_leave_the_services_to_another_runs(
    cfg: StackConfig, stand_ins: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first run's to end stopped them under the other's.
    def up(cfg: StackConfig) -> None:
        stack.up_infra(cfg)
        for name in ("todo-0", "gateway-0", "envoy"):
            if name not in running(cfg.run_dir):
                start(cfg.run_dir, sleeper(name))

    monkeypatch.setattr(stack, "up", up)
    with sessions.session(cfg), sessions.mesh(cfg):
        services = running(cfg.run_dir)
        with sessions.mesh(cfg):
            pass
        assert running(cfg.run_dir) == services
    assert set(running(cfg.run_dir)) == INFRA  # the last to end stops them, as ever


def test_task_test_and_task_bench_end_with_a_down_that_yields_to_other_runs() -> None:
    tasks = yaml.safe_load((ROOT / "Taskfile.yml").read_text())["tasks"]
    for name in ("test", "bench"):
        defers = [cmd["defer"] for cmd in tasks[name]["cmds"] if isinstance(cmd, dict) and "defer" in cmd]
        assert defers == ["{{.DEVSTACK}} --profile test down --unless-in-use >/dev/null"], name


def test_the_down_that_yields_says_so_and_succeeds(
    env: dict[str, str], cfg: StackConfig, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # What `task test`'s end runs: the run itself passed.
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with other_session(env) as other:
        parts = running(cfg.run_dir)
        assert cli.main(["--profile", "test", "down", "--unless-in-use"]) == 0
        assert running(cfg.run_dir) == parts
        said = capsys.readouterr()
        assert said.err == f"test stack: left running: test sessions still use it (pid {other.pid})\n"
