"""Test runs take turns at the test stack: they share its data, which each test empties as it starts."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from devstack import lock, sessions, stack
from devstack.config import ROOT, StackConfig
from devstack.procs import running, wait_until

from .conftest import INFRA, other_session, session_process

# Long enough for what the tests do while a waiter waits; a waiter a failed
# test leaves gives up within it.
WAITER_BOUND = 30.0
# A session, in a process of its own, that waits for no one's turn: it says
# so once in it, or fails naming the one whose turn it is.
SESSION_IN_TURN = shlex.join(
    [
        sys.executable,
        "-c",
        "from devstack import lock; from devstack.config import StackConfig;"
        " cfg = StackConfig.from_env(profile='test');"
        " lock.turn(cfg.run_dir, 'benchmark', wait=0).__enter__(); print('in the turn')",
    ]
)


@contextlib.contextmanager
def waiting(cfg: StackConfig) -> Iterator[threading.Event]:
    """A session of this process's, in a thread, for the block: the event is set once it has its turn."""
    joined = threading.Event()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            with sessions.session(cfg, wait=WAITER_BOUND):
                joined.set()
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield joined
    finally:
        thread.join(timeout=2 * WAITER_BOUND)
    if failed:
        raise failed[0]


def said(capsys: pytest.CaptureFixture[str]) -> str:
    """What this process says, once it has said a line (from whichever thread)."""
    out: list[str] = []

    def line() -> str:
        out.append(capsys.readouterr().out)
        return "".join(out) if "".join(out).endswith("\n") else ""

    return str(wait_until(line, timeout=10, what="a line said", interval=0.05))


def test_a_run_waits_for_the_one_at_work_and_starts_when_it_ends(
    env: dict[str, str], cfg: StackConfig, stand_ins: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # Two at once emptied each other's tables: one's count of the outbox rows
    # it had written failed as the other truncated them.
    with other_session(env) as other:
        parts = running(cfg.run_dir)
        with waiting(cfg) as joined:
            assert said(capsys) == f"waiting for the test session (pid {other.pid}) to end ...\n"
            assert not joined.wait(1.0)  # polled several times meanwhile
            other.communicate(timeout=30)  # its tests done, its stdin closed, it ends
            assert other.returncode == 0
            assert joined.wait(10)
        assert running(cfg.run_dir) == parts
    assert stand_ins == []  # the infrastructure the other started, used as it is


def test_a_run_gives_up_at_the_bound_naming_the_one_at_work(
    env: dict[str, str], cfg: StackConfig, stand_ins: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with other_session(env, "benchmark") as other:
        began = time.monotonic()
        busy = f"the benchmark (pid {other.pid}) still has its turn at the stack in {cfg.run_dir}, after 0.5 s"
        with pytest.raises(lock.Busy, match=re.escape(busy)), sessions.session(cfg, "benchmark", wait=0.5):
            pytest.fail("it ran beside the other")
        assert 0.5 <= time.monotonic() - began < 10
    assert capsys.readouterr().out == f"waiting for the benchmark (pid {other.pid}) to end ...\n"
    assert stand_ins == []


def test_a_run_killed_outright_frees_its_turn_at_once(
    env: dict[str, str], cfg: StackConfig, stand_ins: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with other_session(env) as other, waiting(cfg) as joined:
        assert said(capsys).startswith("waiting for the test session")
        other.send_signal(signal.SIGKILL)
        other.wait(timeout=30)
        assert joined.wait(5)  # a poll or two, not the bound


def test_the_end_of_a_run_leaves_the_stack_to_one_waiting_for_its_turn(cfg: StackConfig, env: dict[str, str]) -> None:
    # `task test`'s end (down --unless-in-use), as the next run waits: it
    # stopped what the next would start again.
    with lock.turn(cfg.run_dir, "test session", wait=0):
        waiter = session_process(env)
        try:
            wait_until(
                lambda: waiter.pid in (lock.in_use(cfg.run_dir, lock.SESSIONS) or []),
                timeout=30,
                what="the next run to wait",
            )
            with lock.held(cfg.run_dir, "down"), pytest.raises(stack.InUse, match=f"pid {waiter.pid}"):
                stack.down(cfg, unless_in_use=True)
        finally:
            waiter.kill()
            waiter.communicate(timeout=30)


def test_a_session_in_its_own_runs_turn_does_not_wait_for_it(cfg: StackConfig, stand_ins: list[str]) -> None:
    # pytest's `infra` fixture, in the turn the root conftest took.
    with sessions.turn(cfg), sessions.session(cfg, wait=0.5):
        assert set(running(cfg.run_dir)) == INFRA
        assert lock.in_use(cfg.run_dir, lock.RUNS) == [os.getpid()]
    assert lock.in_use(cfg.run_dir, lock.RUNS) is None


def _runtestloop(pytestconfig: pytest.Config) -> Any:
    """The root conftest's hook, as pytest loaded it."""
    path = str(ROOT / "conftest.py")
    root = next(p for p in pytestconfig.pluginmanager.get_plugins() if getattr(p, "__file__", None) == path)
    return root.pytest_runtestloop


def _run_of(*fixtures: str) -> Any:
    """A pytest session, as the hook sees one: one test, which uses ``fixtures``."""
    return SimpleNamespace(
        config=SimpleNamespace(option=SimpleNamespace(collectonly=False)),
        items=[SimpleNamespace(fixturenames=list(fixtures))],
    )


def test_a_pytest_run_takes_its_turn_before_its_first_test_and_keeps_it_to_the_end(
    env: dict[str, str], cfg: StackConfig, monkeypatch: pytest.MonkeyPatch, pytestconfig: pytest.Config
) -> None:
    # Taken in the `infra` fixture, the wait for another run's turn would have
    # counted towards the first test's timeout: failed at 300 s.
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sessions, "TURN_WAIT", 0.5)
    hook = _runtestloop(pytestconfig)
    tests = hook(_run_of("stack_config", "infra", "migrated_database"))
    next(tests)
    assert lock.in_use(cfg.run_dir, lock.RUNS) == [os.getpid()]
    with pytest.raises(StopIteration):
        tests.send(None)
    assert lock.in_use(cfg.run_dir, lock.RUNS) is None
    # One that needs no stack (tests/docs alone) waits for no other's turn.
    with other_session(env) as other:
        tests = hook(_run_of("tmp_path"))
        next(tests)
        assert lock.in_use(cfg.run_dir, lock.RUNS) == [other.pid]
        with pytest.raises(StopIteration):
            tests.send(None)


def test_a_pytest_run_that_waits_out_the_bound_ends_naming_the_one_at_work(
    env: dict[str, str], cfg: StackConfig, monkeypatch: pytest.MonkeyPatch, pytestconfig: pytest.Config
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sessions, "TURN_WAIT", 0.5)
    with other_session(env, "benchmark") as other:
        tests = _runtestloop(pytestconfig)(_run_of("infra"))
        with pytest.raises(pytest.exit.Exception, match=re.escape(f"the benchmark (pid {other.pid}) still has")):
            next(tests)


def test_a_turn_handed_down_covers_every_session_of_the_command_and_no_other(
    env: dict[str, str], cfg: StackConfig, stand_ins: list[str]
) -> None:
    # `task bench`: three benchmarks, each a process with a session of its
    # own. Each took its own turn, and a test run waiting for one could have
    # its turn between two of them.
    one_then_another = f"{SESSION_IN_TURN} && {SESSION_IN_TURN}"
    turn = subprocess.run(
        [sys.executable, "-m", "devstack", "--profile", "test", "turn", "--", "sh", "-c", one_then_another],
        env={**os.environ, **env, "PYTHONPATH": str(ROOT / "scripts")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert turn.returncode == 0, turn.stderr
    assert turn.stdout == "in the turn\n" * 2
    assert lock.in_use(cfg.run_dir, lock.RUNS) is None  # given back at the end

    # Handed down only to the holder's own descendants: the variable, left
    # in a shell, lets no run in beside another.
    with other_session(env) as other:
        handed = {**env, lock.TURN_ENV: str(cfg.run_dir.resolve()), "PYTHONPATH": str(ROOT / "scripts")}
        outsider = subprocess.run(
            ["sh", "-c", SESSION_IN_TURN], env={**os.environ, **handed}, capture_output=True, text=True, timeout=120
        )
        assert outsider.returncode != 0
        assert f"the test session (pid {other.pid}) still has its turn" in outsider.stderr


# A command that tears down for a moment when told to stop, and says
# whether the turn was still held for it as it did.
TEARS_DOWN = """
import signal, sys, time
from devstack import lock
from devstack.config import StackConfig

run_dir = StackConfig.from_env(profile="test").run_dir

def stop(*_):
    time.sleep(0.5)
    print("held" if lock.in_use(run_dir, lock.RUNS) is not None else "given back", flush=True)
    sys.exit(0)

signal.signal(signal.SIGTERM, stop)
print("running", flush=True)
time.sleep(60)
"""


def test_a_turn_lasts_until_its_command_has_torn_down(env: dict[str, str], cfg: StackConfig) -> None:
    # A SIGTERM ended the holder at once and gave the turn back while the
    # benchmark still stopped its processes and deleted its rows: a waiting
    # test run would have started beside that.
    turn = subprocess.Popen(
        [sys.executable, "-m", "devstack", "--profile", "test", "turn", "--", sys.executable, "-c", TEARS_DOWN],
        env={**os.environ, **env, "PYTHONPATH": str(ROOT / "scripts")},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert turn.stdout is not None
        assert turn.stdout.readline() == "running\n"
        turn.send_signal(signal.SIGTERM)
        out, _ = turn.communicate(timeout=30)
    finally:
        turn.kill()
    assert out == "held\n"
    assert turn.returncode == 0
    assert lock.in_use(cfg.run_dir, lock.RUNS) is None
