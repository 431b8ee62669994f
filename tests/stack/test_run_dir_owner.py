"""A run directory that another user's stack made: one line saying whose it is and what to do, not a traceback."""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
from collections.abc import Callable
from pathlib import Path

import pytest

from devstack import cli, lock

NOBODY = 65534


def _refused(path: Path) -> Callable[[Path, str], contextlib.AbstractContextManager[None]]:
    """lock.held as another user's lock file refuses a command: EACCES on ``path``."""

    def held(run_dir: Path, command: str, *, wait: float = 0.0) -> contextlib.AbstractContextManager[None]:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    return held


def test_a_run_dir_left_by_another_users_stack_is_said_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Root's `task up`, then `task down` as oneself: PermissionError on command.lock, a traceback.
    monkeypatch.setenv("MESH_RUN_DIR", str(tmp_path))
    run_dir = tmp_path / "dev"
    run_dir.mkdir()
    held = run_dir / lock.LOCK_FILE
    held.touch()
    if os.geteuid() == 0:  # another user's, as after root's `task up`; one's own will do otherwise
        os.chown(held, NOBODY, NOBODY)
    owner = pwd.getpwuid(held.stat().st_uid).pw_name
    monkeypatch.setattr(lock, "held", _refused(held))

    assert cli.main(["down"]) == 1
    said = capsys.readouterr().err
    assert said.count("\n") == 1 and said.startswith("error: ")
    assert f"{held}: permission denied, and {held} is {owner}'s" in said
    assert f"remove {run_dir} as {owner}" in said and "MESH_RUN_DIR=" in said

    # One on a file not the stack's is a bug of ours: its traceback stays.
    monkeypatch.setattr(lock, "held", _refused(tmp_path.parent / "elsewhere"))
    with pytest.raises(PermissionError):
        cli.main(["down"])
