"""Pid files name the stack's processes, and only those, for as long as they live."""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from devstack.config import ROOT, TEST_PORTS, StackConfig
from devstack.pidfile import alive
from devstack.procs import Proc, running, start, stop, wait_until

from .conftest import SLEEP, group, sleeper, unused_port

# A pid no process can have: past the kernel's largest pid_max (2**22).
GONE = 2**22 + 1


def test_stop_kills_the_whole_process_group(tmp_path: Path) -> None:
    cfg = StackConfig(name="unit", run_dir=tmp_path, ports=TEST_PORTS)
    # A parent that leaves a child behind, as a shell script might.
    sleeper = "import time; time.sleep(60)"
    script = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {sleeper!r}]); time.sleep(60)"
    pid = start(cfg.run_dir, Proc("orphan-maker", [sys.executable, "-c", script], env={}))
    assert running(cfg.run_dir) == {"orphan-maker": pid}
    wait_until(lambda: len(group(pid)) == 2, timeout=10, what="the child to start")
    stop(cfg.run_dir, "orphan-maker", grace=5)
    assert running(cfg.run_dir) == {}
    assert group(pid) == []


def test_a_pid_reused_by_another_process_is_never_signalled(tmp_path: Path) -> None:
    cfg = StackConfig(name="unit", run_dir=tmp_path, ports=TEST_PORTS)
    start(cfg.run_dir, sleeper("ours"))
    pidfile = tmp_path / "pids" / "ours.pid"
    started = pidfile.read_text().split()[1]  # pid, start time, fingerprint, mark
    stop(cfg.run_dir, "ours", grace=5)
    # Ours is gone and someone else's process now holds "its" pid: the pid
    # file names the right number with the start time of the old process.
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        pidfile.write_text(f"{stranger.pid} {started}")
        assert running(cfg.run_dir) == {}
        pidfile.write_text(f"{stranger.pid} {started}")
        assert stop(cfg.run_dir, "ours", grace=1) is False
        assert stranger.poll() is None, "stop() signalled a process it did not start"
    finally:
        stranger.kill()
        stranger.wait()


def test_a_pid_file_written_anew_while_running_reads_the_old_one_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `up` scales the services in parallel threads: one thread's running() took
    # todo-0's file for a dead process's (a crash's, from before) just as another
    # thread started todo-0 and wrote it anew, and deleted the new one.
    (tmp_path / "pids").mkdir()
    (tmp_path / "pids" / "todo-0.pid").write_text(f"{GONE} - old")
    real_kill = os.kill
    fresh: list[int] = []

    def kill(pid: int, sig: int) -> None:
        if pid == GONE and not fresh:  # running() is asking whether the old one lives
            fresh.append(start(tmp_path, sleeper("todo-0")))
        real_kill(pid, sig)

    monkeypatch.setattr(os, "kill", kill)
    try:
        assert running(tmp_path) == {}  # read before the new one was written
        assert running(tmp_path) == {"todo-0": fresh[0]}
    finally:
        monkeypatch.undo()
        stop(tmp_path, "todo-0")


def _leader_gone_child_left(run_dir: Path) -> int:
    """A process group whose leader has exited, leaving its child, as RabbitMQ's
    wrapper script can leave beam.smp: the leader's pid (the group's id)."""
    script = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {SLEEP!r}])"
    leader = start(run_dir, Proc("rabbitmq", [sys.executable, "-c", script], env={}))
    wait_until(lambda: not alive(leader) and len(group(leader)) == 1, timeout=10, what="the leader to exit")
    return leader


def test_a_group_whose_leader_exited_is_still_running_and_is_stopped(tmp_path: Path) -> None:
    # Its pid file was deleted, and `down` never stopped the group.
    leader = _leader_gone_child_left(tmp_path)
    try:
        assert running(tmp_path) == {"rabbitmq": leader}
        assert stop(tmp_path, "rabbitmq", grace=5) is True
        assert group(leader) == []
        assert running(tmp_path) == {}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader, signal.SIGKILL)


def test_a_group_whose_leader_exited_is_ours_only_if_its_members_carry_our_mark(tmp_path: Path) -> None:
    # The group's id cannot be another's while a member lives; the mark in
    # the members' environment stands for when all of them have gone and the
    # number was handed out again, to a group that is not ours.
    leader = _leader_gone_child_left(tmp_path)
    pidfile = tmp_path / "pids" / "rabbitmq.pid"
    fields = pidfile.read_text().split()
    try:
        for recorded in (fields[:3], [*fields[:3], "another-start"]):  # a file from before marks; another's mark
            pidfile.write_text(" ".join(recorded))
            assert running(tmp_path) == {}
            pidfile.write_text(" ".join(recorded))
            assert stop(tmp_path, "rabbitmq", grace=1) is False
            assert len(group(leader)) == 1
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader, signal.SIGKILL)


def test_a_member_whose_environment_cannot_be_read_keeps_its_group_ours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # beam.smp runs as the rabbitmq user, and root without CAP_SYS_PTRACE (a
    # container's) may not read its environment: its group was taken for gone,
    # its pid file deleted, and beam.smp left running with nothing to stop it.
    leader = _leader_gone_child_left(tmp_path)
    real_read_bytes = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self.name == "environ":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    try:
        assert running(tmp_path) == {"rabbitmq": leader}
        assert stop(tmp_path, "rabbitmq", grace=5) is True
        assert group(leader) == []
    finally:
        monkeypatch.undo()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader, signal.SIGKILL)


SYSTEM_PYTHON = Path("/usr/bin/python3")


@pytest.mark.skipif(
    os.geteuid() != 0 or not SYSTEM_PYTHON.exists(), reason="needs root, to run `down` as another user (nobody)"
)
def test_down_by_a_user_leaves_a_group_of_another_users_alone_without_a_traceback(tmp_path: Path) -> None:
    # After a reboot, a pid file's group id can be any user's. To a user who
    # is not root, that group's hidden environment was taken for ours: `down`
    # signalled its gone leader's pid, and crashed with a traceback.
    nobody = pwd.getpwnam("nobody")
    # Run by root here, and so another user's to nobody; in a run directory
    # nobody may use (pytest's own tmp_path is closed to other users).
    with tempfile.TemporaryDirectory(dir="/tmp") as shared:
        run_dir = Path(shared) / "dev"
        leader = _leader_gone_child_left(run_dir)
        os.waitpid(leader, 0)  # reaped: as after a reboot, its pid is no process's
        try:
            # As if nobody had made them: the run directory, and the pid files' lock.
            for mine in (Path(shared), run_dir, run_dir / "pids", run_dir / "pids" / ".lock"):
                mine.chmod(0o777)
            env = {
                "PATH": os.environ["PATH"],
                "PYTHONPATH": str(ROOT / "scripts"),
                "MESH_RUN_DIR": shared,
                "MESH_PORT_EPMD": str(unused_port()),
            }
            # The system's Python: the venv's may live where nobody cannot reach (/root).
            down = subprocess.run(
                [str(SYSTEM_PYTHON), "-m", "devstack", "down"],
                env=env,
                user=nobody.pw_uid,
                group=nobody.pw_gid,
                extra_groups=[],
                cwd="/",
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert (down.returncode, down.stderr) == (0, "")
            assert down.stdout == "dev stack: nothing was running\n"
            assert len(group(leader)) == 1  # not signalled: it could not be
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(leader, signal.SIGKILL)
