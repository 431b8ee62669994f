"""However `devstack up` is told to stop, it stops what it started: no orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from devstack import cli, mesh, stack
from devstack.config import ROOT, TEST_PORTS, StackConfig
from devstack.pidfile import alive
from devstack.procs import Hopeless, Proc, running, start, stop

from .conftest import sleeper, unused_port

# `devstack up` whose stack is one stand-in process; THEN runs once it is started.
UP = """
import sys, time
from devstack import cli, procs, stack

def up(cfg):
    procs.start(cfg.run_dir, procs.Proc("redis", [sys.executable, "-c", "import time; time.sleep(60)"], env={{}}))
    {then}

stack.up = up
sys.exit(cli.main(["up"]))
"""


def _devstack_up(tmp_path: Path, then: str = "pass") -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "scripts"),
        "MESH_RUN_DIR": str(tmp_path),
        # `down` stops the epmd on the profile's port: not a developer's own stack's.
        "MESH_PORT_EPMD": str(unused_port()),
    }
    with (tmp_path / "stderr").open("w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-c", UP.format(then=then)], env=env, stdout=subprocess.PIPE, stderr=stderr, text=True
        )


def _read_until(up: subprocess.Popen[str], prefix: str) -> None:
    assert up.stdout is not None
    for line in up.stdout:
        if line.startswith(prefix):
            return
    pytest.fail(f"devstack up exited before printing {prefix!r}")


def _end(up: subprocess.Popen[str], run_dir: Path) -> None:
    """Whatever the test found: no `devstack up` and no stand-in left behind."""
    up.kill()
    up.wait()
    if up.stdout is not None:
        up.stdout.close()
    for name in running(run_dir):
        stop(run_dir, name)


def test_a_closed_terminal_stops_the_foreground_stack_like_ctrl_c(tmp_path: Path) -> None:
    up = _devstack_up(tmp_path)
    run_dir = tmp_path / "dev"
    try:
        _read_until(up, "Ctrl-C stops everything")
        stand_in = running(run_dir)["redis"]
        # The terminal gone, writes to it fail (EPIPE here, EIO from a tty): the
        # "stopping ..." line raised, and the teardown it announced never ran.
        assert up.stdout is not None
        up.stdout.close()
        up.send_signal(signal.SIGHUP)
        # 0 if it was waiting already, 129 if the hang-up came just before.
        assert up.wait(timeout=30) in (0, 128 + signal.SIGHUP)
        assert running(run_dir) == {}
        assert not alive(stand_in)
        assert "Traceback" not in (tmp_path / "stderr").read_text()
    finally:
        _end(up, run_dir)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=lambda sig: sig.name)
def test_a_signal_while_up_starts_the_stack_stops_what_it_had_started(tmp_path: Path, sig: signal.Signals) -> None:
    # Left to their default, SIGTERM (go-task's, or kill's) and SIGHUP ended
    # `up` alone, and what it had started ran on in sessions of its own.
    up = _devstack_up(tmp_path, then="print('started', flush=True); time.sleep(60)")
    run_dir = tmp_path / "dev"
    try:
        _read_until(up, "started")
        stand_in = running(run_dir)["redis"]
        up.send_signal(sig)
        assert up.wait(timeout=30) == 128 + sig
        assert running(run_dir) == {}
        assert not alive(stand_in)
        assert f"stopped by {sig.name}" in (tmp_path / "stderr").read_text()
    finally:
        _end(up, run_dir)


def test_a_failed_instance_stops_the_others_waiting_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Consul never answers, so the healthy instances would wait READY_TIMEOUT (90 s)
    # before the failed one's error, and the teardown after it, came.
    ports = replace(TEST_PORTS, consul_http=unused_port(), envoy=unused_port(), envoy_admin=unused_port())
    instances = {"user": 1, "todo": 1, "notification": 1, "gateway": 0}
    cfg = StackConfig(name="unit", run_dir=tmp_path, ports=ports, instances=instances)
    monkeypatch.setattr(stack, "up_infra", lambda cfg: None)

    def service(cfg: StackConfig, svc: str, n: int) -> Proc:
        if svc == "notification":  # one that exits at start
            return Proc(f"{svc}-{n}", [sys.executable, "-c", "pass"], env={})
        return sleeper(f"{svc}-{n}")

    monkeypatch.setattr(mesh, "service", service)
    began = time.monotonic()
    try:
        with pytest.raises(Hopeless, match="notification-0 exited"):
            stack.up(cfg)
        assert time.monotonic() - began < 15
        assert "waiting for the instances still starting" in capsys.readouterr().out
    finally:
        for name in running(cfg.run_dir):
            stop(cfg.run_dir, name)


def test_the_foreground_stack_outlives_a_crash_of_consul_alone(tmp_path: Path) -> None:
    cfg = StackConfig.from_env({"MESH_RUN_DIR": str(tmp_path)})
    for name in ("consul", "redis"):
        start(cfg.run_dir, sleeper(name))
    outcome: list[bool] = []
    supervisor = threading.Thread(target=lambda: outcome.append(cli.supervise(cfg, threading.Event())))
    supervisor.start()
    try:
        stop(cfg.run_dir, "consul")  # a crash: Redis runs on, so Ctrl-C must still stop it
        supervisor.join(timeout=2.5)
        assert supervisor.is_alive()
    finally:
        stop(cfg.run_dir, "redis")  # what `task down` does last
    supervisor.join(timeout=5)
    assert outcome == [False]


class _Stopped(Exception):
    """What the test's SIGTERM handler raises, as `up`'s raises Interrupted."""


def _blocked(pid: int) -> int:
    """The signals a process has blocked, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("SigBlk:")[1].split()[0], 16)


def test_a_signal_just_after_a_process_starts_still_leaves_its_pid_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Ctrl-C between the child's start and its pid file orphaned it: it
    # ran on, and nothing could find it to stop it.
    real_popen = subprocess.Popen
    children: list[subprocess.Popen[bytes]] = []

    def popen_then_signal(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        children.append(real_popen(*args, **kwargs))
        os.kill(os.getpid(), signal.SIGTERM)  # handled at once, in this (the main) thread
        return children[-1]

    def stopped(signum: int, _: object) -> None:
        raise _Stopped

    monkeypatch.setattr(subprocess, "Popen", popen_then_signal)
    previous = signal.signal(signal.SIGTERM, stopped)
    try:
        with pytest.raises(_Stopped):
            start(tmp_path, sleeper("redis"))
        (child,) = children
        assert running(tmp_path) == {"redis": child.pid}
        # Nor held back in the child: it hears what `stop` sends it.
        assert _blocked(child.pid) & (1 << (signal.SIGTERM - 1) | 1 << (signal.SIGINT - 1)) == 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        monkeypatch.undo()
        for child in children:
            child.kill()
            child.wait()
        stop(tmp_path, "redis")
