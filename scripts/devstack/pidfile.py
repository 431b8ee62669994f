"""Pid files: which of this machine's processes is which part of the stack.

A file names its process by pid and start time (a pid reused by another
process is not ours), with the fingerprint of what it runs (see
``Proc.fingerprint``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# In /proc/<pid>/stat after the command name: the state, and 19 fields
# later the start time in clock ticks after boot.
_STATE, _START_TIME = 0, 19


@dataclass(frozen=True)
class Entry:
    pid: int
    started: str = "-"  # "-": unknown, and not checked
    fingerprint: str = ""

    def __str__(self) -> str:
        return f"{self.pid} {self.started} {self.fingerprint}"


@dataclass(frozen=True)
class Found:
    path: Path
    entry: Entry | None  # None: not a pid file of ours (garbage)
    identity: tuple[int, int]  # the file's inode and mtime, to tell a newer one written since


def path(directory: Path, name: str) -> Path:
    return directory / f"{name}.pid"


def started_at(pid: int) -> str:
    stat = _stat(pid)
    return stat[_START_TIME] if stat else "-"


def write(directory: Path, name: str, entry: Entry) -> None:
    # Written aside and renamed: a ``running()`` that read a half-written file
    # would take it for a dead process's and delete it.
    partial = directory / f"{name}.pid.partial"
    partial.write_text(str(entry))
    with _locked(directory):
        partial.replace(path(directory, name))


def read(file: Path) -> Found | None:
    """What ``file`` says, or None if there is no such file (or it cannot be read)."""
    try:
        with file.open() as opened:
            stat = os.fstat(opened.fileno())
            fields = opened.read().split()
    except OSError:
        return None
    try:
        entry: Entry | None = Entry(int(fields[0]), *fields[1:3]) if fields else None
    except ValueError:
        entry = None
    return Found(file, entry, (stat.st_ino, stat.st_mtime_ns))


def forget(found: Found) -> None:
    """Delete the file ``found`` was read from, unless it has been written anew since.

    ``up`` starts services in parallel threads: one thread may find a file
    stale just as another starts that process again and writes it anew.
    """
    with _locked(found.path.parent), contextlib.suppress(FileNotFoundError):
        now = found.path.stat()
        if (now.st_ino, now.st_mtime_ns) == found.identity:
            found.path.unlink()


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Held while a pid file is replaced, or checked unchanged and deleted: across threads and processes."""
    with (directory / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def live(entry: Entry) -> bool:
    """Whether the process ``entry`` names still runs: not if its pid is another process's now."""
    return alive(entry.pid) and (entry.started == "-" or started_at(entry.pid) == entry.started)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours is dead for every purpose here.
    stat = _stat(pid)
    return stat is not None and stat[_STATE] != "Z"


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may itself hold spaces or ")".
    return text.rsplit(")", 1)[1].split()
