"""One command at a time changes a stack: ``up``, ``scale`` and ``down`` hold its run directory's lock.

Two ``up`` runs at once both found the ports free and started every part;
the second's pid files hid the first's Consul and PostgreSQL from ``down``
for good, and its initdb deleted the first's half-made data directory. A
second command now refuses at once, naming the one at work. The lock is
an flock: a holder killed outright (SIGKILL, a power cut) holds it no more.
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


def _take(lock: TextIO) -> bool:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _holder(lock: TextIO) -> str:
    """What the holder wrote of itself ("`up` (pid 123)"), if it has yet."""
    lock.seek(0)
    pid, _, command = lock.read().strip().partition(" ")
    return f"`{command}` (pid {pid})" if pid.isdigit() and command else "another devstack command"
