"""Detached processes with pid files, so that ``down`` can always find them.

Each process gets its own session (and process group): Ctrl-C in the
terminal reaches only the supervisor, which then stops everything in order,
and ``down`` from another terminal kills whole groups, children included.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO, TypedDict

from . import pidfile, reads
from .signals import held_back

# Children we started, kept so that Popen does not warn that they outlive it:
# outliving this process is the point (``down`` finds them by pid file).
_started: dict[int, subprocess.Popen[bytes]] = {}


class StackError(RuntimeError):
    """Something the user must fix: a taken port, a missing binary, a timeout."""


class Hopeless(StackError):
    """A condition being waited for can no longer come true (its process exited)."""


def say(text: str, *, file: TextIO | None = None) -> None:
    """Progress output (``file``: stdout if None) that a terminal gone away cannot break.

    After a hang-up, writes to the terminal fail (EIO, or EPIPE once go-task
    has died too). Raised, such an error skipped the teardown the line was
    announcing; instead, the stream goes to /dev/null from then on, so that
    neither a later line nor the flush at exit fails on it again.
    """
    stream = sys.stdout if file is None else file
    try:
        print(text, file=stream, flush=True)
    except OSError:
        with contextlib.suppress(OSError, ValueError):  # ValueError: no fileno (a test's capture)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)


@dataclass(frozen=True)
class Proc:
    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    user: str | None = None
    cwd: Path | None = None
    # Directories (or files) whose contents are the process's code or
    # configuration: a process started from other contents is stale.
    sources: tuple[Path, ...] = ()
    # Ours (a service, a gateway): the module whose ``Settings.from_env`` it
    # reads its settings with. None of the variables read is inherited.
    settings: str | None = None

    def fingerprint(self) -> str:
        """What this process would run: its command, environment and sources, hashed."""
        digest = hashlib.sha256()
        for part in (*self.argv, *sorted(f"{k}={v}" for k, v in self.env.items()), str(self.user), str(self.cwd)):
            digest.update(part.encode() + b"\0")
        for source in self.sources:
            files = sorted(source.rglob("*")) if source.is_dir() else [source]
            for file in files:
                if file.is_file() and "__pycache__" not in file.parts:
                    digest.update(str(file).encode() + b"\0" + file.read_bytes())
        return digest.hexdigest()[:16]


class _RunAs(TypedDict, total=False):
    """The Popen arguments that run a child as another user (empty: as we are)."""

    user: int
    group: int
    extra_groups: list[int]


def _run_as(entry: pwd.struct_passwd) -> _RunAs:
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def pid_dir(run_dir: Path) -> Path:
    return run_dir / "pids"


# Logs are appended across restarts, so that a restart keeps the history; but
# a few benchmark runs write gigabytes of access lines.
LOG_KEEP_BYTES = 64 * 2**20


def log_path(run_dir: Path, name: str) -> Path:
    return run_dir / "logs" / f"{name}.log"


def rotate_log(path: Path, limit: int) -> None:
    """Past ``limit`` bytes, move the log to ``<name>.1``: one older generation is kept."""
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size > limit:
            path.replace(path.with_name(path.name + ".1"))


def inherited_env(without: Collection[str] = ()) -> dict[str, str]:
    """What a stack process takes from ours: all of it but libpq's own variables, and ``without``.

    libpq reads PGSSLMODE, PGDATABASE, PGOPTIONS and the rest even beside a
    URL, and compose's containers have none of them: a developer's own
    settings for another database must not break this stack's, natively only.
    ``without``: the settings a service reads (see reads.py), for the same reason.
    """
    return {name: value for name, value in os.environ.items() if not name.startswith("PG") and name not in without}


def start(run_dir: Path, proc: Proc) -> int:
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    pid_dir(run_dir).mkdir(parents=True, exist_ok=True)
    rotate_log(log_path(run_dir, proc.name), LOG_KEEP_BYTES)
    # Hashed before the start, which holds back the stop signals: not for longer than it must.
    fingerprint = proc.fingerprint()
    mark = secrets.token_hex(8)
    log = open(log_path(run_dir, proc.name), "ab")  # noqa: SIM115 - handed to the child
    own = reads.read_by(proc.settings, proc.env) if proc.settings is not None else ()
    env = {**inherited_env(without=own), **proc.env, pidfile.MARK: mark}
    run_as: _RunAs = {}
    if proc.user is not None and os.geteuid() == 0:
        entry = pwd.getpwnam(proc.user)
        run_as = _run_as(entry)
        env["HOME"] = str(proc.env.get("HOME", entry.pw_dir))
        env["USER"] = env["LOGNAME"] = proc.user
    # A Ctrl-C from the child's start to its pid file orphaned it: it waits until after.
    with held_back():
        child = subprocess.Popen(
            list(proc.argv),
            env=env,
            cwd=proc.cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **run_as,
        )
        log.close()
        _started[child.pid] = child
        # The start time makes the pid file name this process, not whichever
        # process gets its pid after it is gone.
        pidfile.write(
            pid_dir(run_dir), proc.name, pidfile.Entry(child.pid, pidfile.started_at(child.pid), fingerprint, mark)
        )
    return child.pid


def _find(run_dir: Path, name: str) -> tuple[pidfile.Found, pidfile.Entry] | None:
    """The pid file of ``name``, and what it says, if that runs; a stale one is deleted."""
    found = pidfile.read(pidfile.path(pid_dir(run_dir), name))
    if found is None:
        return None
    if found.entry is not None and pidfile.live(found.entry):
        return found, found.entry
    pidfile.forget(found)
    return None


def started_as(run_dir: Path, name: str) -> str | None:
    """The fingerprint ``name`` was started with, if it is running (see ``Proc.fingerprint``)."""
    found = _find(run_dir, name)
    return found[1].fingerprint if found is not None else None


def running(run_dir: Path) -> dict[str, int]:
    """Each running process of the stack by name, with its pid (its group's, once the leader has exited)."""
    names = {}
    for file in sorted(pid_dir(run_dir).glob("*.pid")):
        found = _find(run_dir, file.stem)
        if found is not None:
            names[file.stem] = found[1].pid
    return names


def stop(run_dir: Path, name: str, *, sig: int = signal.SIGTERM, grace: float = 10.0) -> bool:
    """Signal a process group, wait up to ``grace``, then SIGKILL it."""
    found = _find(run_dir, name)
    if found is None:
        return False
    file, entry = found
    pid = entry.pid
    _signal_group(pid, sig)
    deadline = time.monotonic() + grace
    while pidfile.live(entry) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.05)
    if pidfile.live(entry):
        _signal_group(pid, signal.SIGKILL)
        wait_until(lambda: not pidfile.live(entry) or _reap(pid), timeout=5, what=f"{name} to die")
    # Children that outlived their leader share its group: kill them too.
    _signal_group(pid, signal.SIGKILL)
    _reap(pid)
    child = _started.pop(pid, None)
    if child is not None:
        child.returncode = child.returncode if child.returncode is not None else -sig
    pidfile.forget(file)
    return True


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        # Members of another user's: the leader alone may be ours to signal, and gone.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _reap(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return False


def wait_until(
    check: Callable[[], object], *, timeout: float, what: str, interval: float = 0.1, log: Path | None = None
) -> object:
    """Poll ``check`` until it returns something truthy, for at most ``timeout`` s.

    ``log``: where the reason is likelier to be than in the last error, named in the timeout's message.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
        except Hopeless:
            raise
        except Exception as exc:  # not ready yet: keep the reason for the message
            last_error = exc
        else:
            if result:
                return result
        time.sleep(interval)
    reason = f" (last error: {last_error})" if last_error else ""
    see = f"; see {log}" if log is not None else ""
    raise StackError(f"timed out after {timeout:.0f}s waiting for {what}{reason}{see}")


def run_checked(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    user: str | None = None,
    timeout: float = 60,
    stdin: str | None = None,
) -> str:
    run_as: _RunAs = {}
    if user is not None and os.geteuid() == 0:
        run_as = _run_as(pwd.getpwnam(user))
    result = subprocess.run(
        list(argv),
        env={**inherited_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/",
        input=stdin,
        **run_as,
    )
    if result.returncode != 0:
        raise StackError(f"{argv[0]} failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout
