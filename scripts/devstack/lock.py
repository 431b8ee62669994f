"""One command at a time changes a stack: ``up``, ``scale`` and ``down`` hold its run directory's lock.

Two ``up`` runs at once both found the ports free and started every part;
the second's pid files hid the first's Consul and PostgreSQL from ``down``
for good, and its initdb deleted the first's half-made data directory. A
second command now refuses at once, naming the one at work. The lock is
an flock: a holder killed outright (SIGKILL, a power cut) holds it no more.

Test sessions (pytest's, a benchmark's) take turns at a stack (``turn``):
they share its data, which each test empties (see devstack.sessions). Each
also holds a shared flock of its own on it (``Users``), from the start of
its wait to its end: what the end of one asks (``in_use``) before it stops
a stack that another uses, or waits to use.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from .procs import StackError, say

LOCK_FILE = "command.lock"
POLL_SECONDS = 0.2
# Held shared by each test session that uses the stack or waits for its turn.
SESSIONS = "sessions.lock"
# Held exclusively by the test session whose turn it is.
RUNS = "runs.lock"

# The turns this process holds, by run directory and thread: a session in one
# (pytest's fixture, in the turn its hook took) is the same run, not one to wait for.
_turns: set[tuple[Path, int]] = set()
# Set by `devstack turn` for the command it runs, to the run directory whose
# turn it holds: the sessions of that command's processes (each of `task
# bench`'s benchmarks) are in its turn, not runs that wait for it.
TURN_ENV = "MESH_TURN_RUN_DIR"


class Busy(StackError):
    """Another command holds the stack's lock, or another test session its turn."""


@contextlib.contextmanager
def held(run_dir: Path, command: str, *, wait: float = 0.0) -> Iterator[None]:
    """The stack's lock, for the block, as ``command``; held by another, refused (after ``wait`` seconds)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / LOCK_FILE).open("a+") as lock:
        if not _wait_for(lock, wait, _holder):
            raise Busy(
                f"{_holder(lock)} is at work on the stack in {run_dir}: wait for it to end,"
                " or stop it (Ctrl-C where it runs), then try again"
            )
        _sign(lock, command)
        yield


@contextlib.contextmanager
def turn(run_dir: Path, what: str, *, wait: float) -> Iterator[None]:
    """The stack's turn, for the block, as ``what`` ("test session"); another's, waited for up to ``wait`` seconds.

    Re-entered by the thread that holds it, it is that thread's still.
    """
    key = (run_dir.resolve(), threading.get_ident())
    if key in _turns or _handed_down(run_dir):
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / RUNS).open("a+") as lock:
        if not _wait_for(lock, wait, _run):
            raise Busy(
                f"{_run(lock)} still has its turn at the stack in {run_dir}, after {_duration(wait)} of waiting:"
                " wait for it to end, or stop it (Ctrl-C where it runs), then try again"
            )
        _sign(lock, what)
        _turns.add(key)
        try:
            yield
        finally:
            _turns.discard(key)


def _handed_down(run_dir: Path) -> bool:
    """Whether a process this one descends from holds the turn and handed it down (``TURN_ENV``).

    The variable alone is not trusted: one left in a shell, or a turn whose
    holder has ended, would let a run in beside another.
    """
    if os.environ.get(TURN_ENV) != str(run_dir.resolve()) or not (run_dir / RUNS).exists():
        return False
    with (run_dir / RUNS).open("a+") as lock:
        if _take(lock):  # nobody holds it (and closing the file lets it go again)
            return False
        pid, _ = _signed(lock)
    return pid.isdigit() and int(pid) in _ancestors()


def _ancestors() -> set[int]:
    """This process's parent, its parent's, and so on (from /proc)."""
    found: set[int] = set()
    pid = os.getppid()
    while pid > 1 and pid not in found:
        found.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        pid = int(stat.rpartition(")")[2].split()[1])
    return found


class Users:
    """This process's use of the stack: a shared flock on ``name`` while it lasts.

    ``join`` is called under ``held()``: ``in_use``, called there too, takes
    the flock exclusively for a moment, and a join then would be refused.
    """

    def __init__(self, run_dir: Path, name: str) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = (run_dir / name).open("a+")

    def __enter__(self) -> Users:
        return self

    def __exit__(self, *_: object) -> None:
        self._file.close()

    def join(self) -> None:
        """Become a user."""
        if not _take(self._file, fcntl.LOCK_SH):
            # Only in_use() holds it exclusively, and only under held().
            raise Busy(f"{self._file.name} is held exclusively by a command that does not hold {LOCK_FILE}")


def in_use(run_dir: Path, name: str) -> list[int] | None:
    """The users of ``name``, by pid (empty when /proc/locks cannot say); None if it has none."""
    path = run_dir / name
    if not path.exists():
        return None
    with path.open("a+") as probe:
        if _take(probe):
            return None
        return _holders(path)


def _holders(path: Path) -> list[int]:
    """Who holds a flock on ``path``, from /proc/locks ("1: FLOCK ADVISORY READ 123 fe:00:4567 0 EOF")."""
    st = path.stat()
    file = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    fields = [line.split() for line in lines]
    return sorted({int(f[4]) for f in fields if len(f) > 5 and f[1] == "FLOCK" and f[5] == file and f[4].isdigit()})


def _take(lock: TextIO, kind: int = fcntl.LOCK_EX) -> bool:
    try:
        fcntl.flock(lock, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _wait_for(lock: TextIO, wait: float, holder: Callable[[TextIO], str]) -> bool:
    """Whether ``lock`` is taken within ``wait`` seconds; a wait says once whom it is for."""
    if _take(lock):
        return True
    if wait > 0:
        say(f"waiting for {holder(lock)} to end ...")
    # Polled, not a blocking flock: a holder suspended (Ctrl-Z) or hung would
    # keep the waiter, deaf to signals (Ctrl-C, or those it tears down on), for good.
    deadline = time.monotonic() + wait
    while not _take(lock):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_SECONDS)
    return True


def _sign(lock: TextIO, what: str) -> None:
    """Write who holds ``lock`` now, for one refused or waiting to name it."""
    lock.truncate(0)
    lock.write(f"{os.getpid()} {what}\n")
    lock.flush()


def _signed(lock: TextIO) -> tuple[str, str]:
    lock.seek(0)
    pid, _, what = lock.read().strip().partition(" ")
    return (pid, what) if pid.isdigit() and what else ("", "")


def _holder(lock: TextIO) -> str:
    """What the holder wrote of itself ("`up` (pid 123)"), if it has yet."""
    pid, command = _signed(lock)
    return f"`{command}` (pid {pid})" if pid else "another devstack command"


def _run(lock: TextIO) -> str:
    """The test session whose turn it is ("the benchmark (pid 123)"), as it wrote itself, if it has yet."""
    pid, what = _signed(lock)
    return f"the {what} (pid {pid})" if pid else "another test session"


def _duration(seconds: float) -> str:
    return f"{seconds / 60:g} minutes" if seconds >= 60 else f"{seconds:g} s"
