"""Pid files: which of this machine's processes is which part of the stack.

A file names its process group by the leader's pid and start time, and a
mark that every member carries in its environment; with them, the
fingerprint of what the process runs (see ``Proc.fingerprint``).

The stack's processes run in sessions of their own, so the leader's pid is
also the group's id. The group can outlive its leader (RabbitMQ's wrapper
script dead, beam.smp running), and is still ours: its id cannot be handed
to another process while it has a member. Once all are gone, it can; so
the members must carry our mark too (or, from root, hide their
environment, as another user's may).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MARK = "DEVSTACK_PROCESS"

# In /proc/<pid>/stat after the command name: the state, the group two
# fields later, and 19 fields after the state the start time in clock
# ticks after boot.
_STATE, _GROUP, _START_TIME = 0, 2, 19


@dataclass(frozen=True)
class Entry:
    pid: int
    started: str = "-"  # "-": unknown, and not checked
    fingerprint: str = ""
    mark: str = ""  # "": a file from before marks, whose group is found by its leader alone

    def __str__(self) -> str:
        return f"{self.pid} {self.started} {self.fingerprint} {self.mark}"


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
        entry: Entry | None = Entry(int(fields[0]), *fields[1:4]) if fields else None
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
    """Whether the group ``entry`` names still has a member running.

    A leader whose pid another process has now (its start time differs) is
    gone, and so is its group: its id was free to hand out.
    """
    if alive(entry.pid):
        return entry.started == "-" or started_at(entry.pid) == entry.started
    return bool(entry.mark) and any(_marked(member, entry.mark) for member in _members(entry.pid))


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


def _stat(pid: int | str) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may itself hold spaces or ")".
    return text.rsplit(")", 1)[1].split()


def _members(group: int) -> Iterator[int]:
    """The live processes of a process group."""
    for proc in Path("/proc").glob("[0-9]*"):
        stat = _stat(proc.name)
        if stat is not None and stat[_GROUP] == str(group) and stat[_STATE] != "Z":
            yield int(proc.name)


def _marked(pid: int, mark: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except PermissionError:
        # As root: another user's (beam.smp runs as rabbitmq), which root
        # without CAP_SYS_PTRACE, as in a container, may not read. A live
        # member keeps the group's id from being handed out, so it is ours
        # unless the id was freed, reused, and its new leader died too: taken
        # as ours. Anyone else runs the whole stack as themselves, and reads
        # its environment: one hidden from them is another user's (after a
        # reboot, a pid file's group id can be anyone's), never ours.
        return os.geteuid() == 0
    except OSError:  # gone
        return False
    return f"{MARK}={mark}".encode() in environ.split(b"\0")
