"""Test runs that use one test stack: each part starts once, nothing stops under a run, a run cleans up alone."""

from __future__ import annotations

import contextlib
import signal
import threading

import pytest
import yaml

from devstack import cli, infra, lock, sessions, stack
from devstack.config import ROOT, StackConfig
from devstack.procs import Proc, running, start

from .conftest import INFRA, other_session, sleeper

LEFT_BY_A_KILLED_RUN = ("envoy", "gateway-0", "todo-0", "notification-0", "bench-echo")


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


def test_a_run_stops_the_services_a_killed_one_left_and_keeps_the_infrastructure(
    cfg: StackConfig, stand_ins: list[str]
) -> None:
    # A todo-service left running by a killed `task test` published, from its
    # relay, the rows the next run's unit suites wrote to its outbox.
    before = _leave_running(cfg, (*stack.INFRA, *LEFT_BY_A_KILLED_RUN))
    with sessions.session(cfg):
        assert running(cfg.run_dir) == {name: pid for name, pid in before.items() if name in INFRA}
    assert stand_ins == []


def test_the_end_to_end_services_stop_when_their_tests_end(
    cfg: StackConfig, stand_ins: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Left running, their outbox relays published the rows later suites' tests wrote.
    def up(cfg: StackConfig) -> None:
        stack.up_infra(cfg)
        for name in ("todo-0", "gateway-0", "envoy"):
            if name not in running(cfg.run_dir):
                start(cfg.run_dir, sleeper(name))

    monkeypatch.setattr(stack, "up", up)
    with sessions.session(cfg):
        with sessions.mesh(cfg):
            assert set(running(cfg.run_dir)) == INFRA | {"todo-0", "gateway-0", "envoy"}
        assert set(running(cfg.run_dir)) == INFRA


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
