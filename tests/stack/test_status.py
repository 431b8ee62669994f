"""`devstack status`: whether a stack runs, by its exit status (scripts/compose-stack asks it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from devstack import cli
from devstack.procs import running, start, stop

from .conftest import sleeper


def test_status_says_by_its_exit_whether_any_of_the_stack_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MESH_RUN_DIR", str(tmp_path))
    run_dir = tmp_path / "dev"
    assert cli.main(["status"]) == cli.NOT_RUNNING
    assert capsys.readouterr().out == "dev stack: not running\n"
    start(run_dir, sleeper("redis"))
    try:
        assert cli.main(["status"]) == 0
        assert capsys.readouterr().out == "dev stack: running (redis)\n"
        # The profile asked about, alone: the dev stack is not the test stack.
        assert cli.main(["--profile", "test", "status"]) == cli.NOT_RUNNING
    finally:
        for name in running(run_dir):
            stop(run_dir, name)
    assert cli.main(["status"]) == cli.NOT_RUNNING
