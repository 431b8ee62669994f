"""`devstack scale`: what it refuses before it starts or stops any instance."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack import cli, mesh, stack
from devstack.procs import running, start, stop

from .conftest import sleeper, unused_port


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The dev stack's run directory, of this test's own; instances are stand-ins, and nothing waits long."""
    monkeypatch.setenv("MESH_RUN_DIR", str(tmp_path))
    monkeypatch.setenv("MESH_PORT_CONSUL_HTTP", str(unused_port()))  # no developer's Consul answers
    monkeypatch.setattr(mesh, "service", lambda cfg, svc, n: sleeper(f"{svc}-{n}"))
    monkeypatch.setattr(stack, "READY_TIMEOUT", 2.0)
    run_dir = tmp_path / "dev"
    yield run_dir
    for name in running(run_dir):
        stop(run_dir, name)


def test_a_count_below_0_is_refused(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Taken, it stopped every instance, then waited for -1 to pass until the timeout.
    start(run_dir, sleeper("todo-0"))
    stand_in = running(run_dir)
    with pytest.raises(SystemExit) as refused:
        cli.main(["scale", "todo", "-1"])
    assert refused.value.code == 2
    assert "argument count: must be a whole number of 0 or more, got '-1'" in capsys.readouterr().err
    assert running(run_dir) == stand_in


@pytest.mark.parametrize("runs", [[], ["postgres", "redis", "rabbitmq", "mailsink"]], ids=["nothing", "no consul"])
def test_a_stack_that_does_not_run_is_refused(
    run_dir: Path, runs: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # Its instances started against nothing, and waited for Consul in vain.
    for name in runs:
        start(run_dir, sleeper(name))
    assert cli.main(["scale", "todo", "2"]) == 1
    said = capsys.readouterr().err
    assert "error: the native stack does not run (no consul" in said and "`task up` first" in said, said
    assert sorted(running(run_dir)) == sorted(runs)
