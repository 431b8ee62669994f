"""One command at a time changes a stack: ``up``, ``scale`` and ``down`` hold its run directory's lock.

Two ``up`` runs at once both found the ports free and started every part;
the second's pid files hid the first's Consul and PostgreSQL from ``down``
for good, and its initdb deleted the first's half-made data directory. A
second command now refuses at once, naming the one at work. The lock is
an flock: a holder killed outright (SIGKILL, a power cut) holds it no more.

Test sessions (pytest's, a benchmark's) that use a stack hold a shared
flock of their own on it for as long as they run (``Users``): what the end
of one asks (``in_use``) before it stops a stack that others still use.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from .procs import StackError, say

LOCK_FILE = "command.lock"
POLL_SECONDS = 0.2
# Held shared by each test session that uses the stack, and by those of them
# that use its services too (the end-to-end tests).
SESSIONS = "sessions.lock"
MESH_USERS = "mesh.lock"


class Busy(StackError):
    """Another command holds the stack's lock."""


@contextlib.contextmanager
def held(run_dir: Path, command: str, *, wait: float = 0.0) -> Iterator[None]:
    """The stack's lock, for the block, as ``command``; held by another, refused (after ``wait`` seconds)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / LOCK_FILE).open("a+") as lock:
        if not _take(lock):
            holder = _holder(lock)
            if wait > 0:
                say(f"waiting for {holder} to end ...")
            # Polled, not a blocking flock: a holder suspended (Ctrl-Z) or
            # hung would keep the waiter, deaf to signals as it tears down,
            # for good.
            deadline = time.monotonic() + wait
            while not _take(lock):
                if time.monotonic() >= deadline:
                    raise Busy(
                        f"{_holder(lock)} is at work on the stack in {run_dir}: wait for it to end,"
                        " or stop it (Ctrl-C where it runs), then try again"
                    ) from None
                time.sleep(POLL_SECONDS)
        # Written once the lock is ours, for a refused command to name us.
        lock.truncate(0)
        lock.write(f"{os.getpid()} {command}\n")
        lock.flush()
        yield


class Users:
    """This process's use of the stack (or of its services): a shared flock on ``name`` while it lasts.

    ``join`` and ``leave`` are called under ``held()``: no other user and no
    ``down`` acts between the question (am I the only one?) and what is done
    on its answer, nor while flock turns one kind of lock into the other, which
    it does not do atomically.
    """

    def __init__(self, run_dir: Path, name: str) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = (run_dir / name).open("a+")

    def __enter__(self) -> Users:
        return self

    def __exit__(self, *_: object) -> None:
        self._file.close()

    def join(self) -> bool:
        """Become a user: whether this is the only one."""
        alone = _take(self._file)
        if not _take(self._file, fcntl.LOCK_SH):
            # Only a `down` or a user leaving holds it exclusively, and only under held().
            raise Busy(f"{self._file.name} is held exclusively by a command that does not hold {LOCK_FILE}")
        return alone

    def leave(self) -> bool:
        """Be a user no more: whether this was the last one."""
        last = _take(self._file)
        self._file.close()
        return last


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


def _holder(lock: TextIO) -> str:
    """What the holder wrote of itself ("`up` (pid 123)"), if it has yet."""
    lock.seek(0)
    pid, _, command = lock.read().strip().partition(" ")
    return f"`{command}` (pid {pid})" if pid.isdigit() and command else "another devstack command"
