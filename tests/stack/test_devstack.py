"""The native stack runner's own promises: clear errors, no orphans, docs that hold."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from devstack import infra, mesh, procs, stack
from devstack.config import ROOT, TEST_PORTS, StackConfig
from devstack.pidfile import alive
from devstack.procs import Proc, StackError, running, start, stop, wait_until
from devstack.signals import STOP_SIGNALS

from .conftest import sleeper, unused_port


def test_a_log_past_its_limit_moves_aside_when_its_process_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(procs, "LOG_KEEP_BYTES", 100)
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "small.log").write_text("kept\n")
    (logs / "big.log").write_text("x" * 101)
    (logs / "big.log.1").write_text("the generation before, dropped")
    for name in ("small", "big"):
        start(tmp_path, Proc(name, [sys.executable, "-c", "print('started')"], env={}))
    wait_until(lambda: not running(tmp_path), timeout=10, what="both to exit")

    assert (logs / "small.log").read_text() == "kept\nstarted\n"
    assert (logs / "big.log.1").read_text() == "x" * 101
    assert (logs / "big.log").read_text() == "started\n"


def test_readme_quick_start_is_setup_then_two_tasks_as_ci_runs_them() -> None:
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "go-task-bin" in quick_start  # where task comes from, since setup installs it
    block = re.search(r"```sh\n(.*?)```", quick_start, re.S)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.split("#")[0].strip()]
    path = 'export PATH="$PWD/.venv/bin:$PATH"'
    assert commands == ["scripts/setup", path, "task up", "task test"]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert ci.index("scripts/setup") < ci.index(path) < ci.index("task test")  # CI is the same, less `task up`


def test_ci_runs_the_readme_test_command() -> None:
    assert (ROOT / ".ci" / "run").read_text().rstrip().endswith("task test")


def test_task_down_stops_the_test_stack_too(tmp_path: Path) -> None:
    # A `task test` that was killed leaves the test stack running, and the
    # README says `task down` stops everything.
    for profile in ("dev", "test"):
        start(tmp_path / profile, sleeper("redis"))
    no_docker = tmp_path / "bin"
    no_docker.mkdir()
    (no_docker / "docker").write_text("#!/bin/sh\nexit 1\n")  # no engine answers: compose's stack is not ours
    (no_docker / "docker").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{no_docker}:{os.environ['PATH']}",
        "MESH_RUN_DIR": str(tmp_path),
        "MESH_PORT_EPMD": str(unused_port()),
    }
    try:
        subprocess.run([str(ROOT / ".venv" / "bin" / "task"), "--dir", str(ROOT), "down"], env=env, check=True)
        assert running(tmp_path / "dev") == {}
        assert running(tmp_path / "test") == {}
    finally:
        for profile in ("dev", "test"):
            for name in running(tmp_path / profile):
                stop(tmp_path / profile, name)


def test_each_profile_has_its_own_run_dir_under_mesh_run_dir(tmp_path: Path) -> None:
    # One for both, and `task test` took the dev stack's pid files for its own, then stopped it.
    env = {"MESH_RUN_DIR": str(tmp_path)}
    dev, test = StackConfig.from_env(env).run_dir, StackConfig.from_env(env, profile="test").run_dir
    assert (dev, test) == (tmp_path / "dev", tmp_path / "test")


def test_a_relative_mesh_run_dir_is_under_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stack's helpers run in "/": `initdb -D myrun/dev/...` made it there.
    monkeypatch.chdir(tmp_path)
    assert StackConfig.from_env({"MESH_RUN_DIR": "myrun"}).run_dir == tmp_path / "myrun" / "dev"


def test_a_secret_file_left_empty_is_made_again(tmp_path: Path) -> None:
    cfg = StackConfig.from_env({"MESH_RUN_DIR": str(tmp_path)})
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "service-client-secret").write_text("")  # a start that died writing it
    secret = cfg.service_secret()
    assert len(secret) >= 32
    assert cfg.service_secret() == secret
    assert [p.name for p in cfg.run_dir.iterdir()] == ["service-client-secret"]  # no drafts left


def test_stack_processes_do_not_inherit_libpqs_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's PGDATABASE or PGSSLMODE, meant for another server, broke this one's (natively only).
    monkeypatch.setenv("PGSSLMODE", "require")
    monkeypatch.setenv("MESH_KEPT", "1")
    seen = procs.run_checked([sys.executable, "-c", "import os; print(sorted(os.environ))"])
    assert "PGSSLMODE" not in seen and "MESH_KEPT" in seen


def test_postgres_runs_the_major_version_that_made_its_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "PG_VERSION").write_text("15\n")
    monkeypatch.setattr(os, "access", lambda path, mode: True)  # the os that infra calls
    assert infra._pg_bin("postgres", tmp_path) == "/usr/lib/postgresql/15/bin/postgres"
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(StackError, match="made by PostgreSQL 15"):
        infra._pg_bin("postgres", tmp_path)


def test_an_initdb_cut_short_is_made_again_by_the_next_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = StackConfig(name="unit", run_dir=tmp_path, ports=TEST_PORTS)
    real_run_checked = procs.run_checked

    def cut_short(argv: list[str], **kwargs: object) -> str:
        # What initdb has done when a Ctrl-C or its timeout stops it: PG_VERSION first.
        target = Path(argv[argv.index("-D") + 1])
        (target / "PG_VERSION").write_text("15\n")
        raise StackError("initdb failed (-9)")

    monkeypatch.setattr(infra, "run_checked", cut_short)
    with pytest.raises(StackError):
        infra.postgres(cfg)
    monkeypatch.setattr(infra, "run_checked", real_run_checked)
    proc = infra.postgres(cfg)  # the real initdb, this time to the end

    data = tmp_path / "postgres" / "data"
    assert proc.argv[proc.argv.index("-D") + 1] == str(data)
    assert (data / "PG_VERSION").exists() and (data / "global" / "pg_control").exists()
    assert sorted(p.name for p in data.parent.iterdir()) == ["data"]


def test_a_consul_build_says_first_that_it_takes_minutes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A first `task up` sat silent for the several minutes of compiling Consul.
    cfg = StackConfig(name="unit", run_dir=tmp_path, ports=TEST_PORTS)
    ensure = tmp_path / "ensure-consul"
    monkeypatch.setattr(infra, "ENSURE_CONSUL", ensure)
    # Far apart, so that a busy machine's slow fork cannot pass for a build.
    monkeypatch.setattr(infra, "QUICK_CONSUL", 1.0)
    for work, building in (("", False), ("sleep 3\n", True)):  # the binary cached; a build
        ensure.write_text(f"#!/bin/sh\n{work}echo /cache/consul\n")
        ensure.chmod(0o755)
        assert infra.consul(cfg).argv[0] == "/cache/consul"
        assert ("building Consul" in capsys.readouterr().out) is building


def test_a_data_directory_made_by_a_postgresql_too_old_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # setup checks the newest PostgreSQL installed; one kept from before may be older.
    (tmp_path / "PG_VERSION").write_text("13\n")
    monkeypatch.setattr(os, "access", lambda path, mode: True)
    with pytest.raises(StackError, match="made by PostgreSQL 13, and the stack needs 14 or later"):
        infra._pg_bin("postgres", tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the infrastructure as users of its own")
def test_a_parent_opened_for_the_stacks_users_is_said_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A clone under /root (700): the rabbitmq user could not reach its data dir, so
    # /root gets o+x. Needed, and kept, but not silently: it is not the stack's directory.
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    infra.owned_dir(private / "run" / "rabbitmq", "nobody")
    said = capsys.readouterr().err
    assert re.search(rf"made .*{private} traversable \(o\+x\) for the nobody user; MESH_RUN_DIR=", said), said
    assert private.stat().st_mode & 0o777 == 0o701
    infra.owned_dir(private / "run" / "redis", "nobody")
    assert capsys.readouterr().err == ""


def test_an_up_that_fails_stops_only_what_it_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from devstack import cli, stack

    monkeypatch.setenv("MESH_RUN_DIR", str(tmp_path))
    run_dir = tmp_path / "dev"
    start(run_dir, sleeper("postgres"))  # the stack already up

    def failing_up(cfg: StackConfig) -> None:
        start(cfg.run_dir, sleeper("todo-1"))
        raise StackError("todo-1 did not pass its check")  # as a `task up TODO=2` may

    monkeypatch.setattr(stack, "up", failing_up)
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        assert cli.main(["up"]) == 1
        assert set(running(run_dir)) == {"postgres"}
        # The teardown ignored them; this process (pytest) must hear Ctrl-C again.
        assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == handlers
    finally:
        for name in running(run_dir):
            stop(run_dir, name)


def _envoy_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("envoy_shared_memory_*")}


def test_the_native_envoy_leaves_no_shared_memory_behind(tmp_path: Path) -> None:
    # With --use-dynamic-base-id, every start left a /dev/shm segment for good.
    # Port 0, read back: ports chosen here could be taken before Envoy binds them.
    ports = {"MESH_PORT_ENVOY": "0", "MESH_PORT_ENVOY_ADMIN": "0"}
    cfg = StackConfig.from_env({"MESH_RUN_DIR": str(tmp_path), **ports}, profile="test")
    admin_address = tmp_path / "envoy-admin-address"
    before = _envoy_segments()
    start(cfg.run_dir, mesh.envoy(cfg, admin_address_path=admin_address))
    try:
        # Read again at each try: the file is empty between Envoy creating it and writing to it.
        wait_until(
            lambda: stack.get_json(f"http://{admin_address.read_text()}/server_info"), timeout=30, what="Envoy's admin"
        )
    finally:
        stop(cfg.run_dir, "envoy")
    assert _envoy_segments() - before == set()


def test_the_stacks_envoy_keeps_its_fixed_ports(tmp_path: Path) -> None:
    # Port 0 is for tests; `task up` prints and checks the ports it asked for.
    cfg = StackConfig.from_env({"MESH_RUN_DIR": str(tmp_path)})
    proc = mesh.envoy(cfg)
    rendered = (cfg.run_dir / "envoy.yaml").read_text()
    assert "{ address: 127.0.0.1, port_value: 8080 }" in rendered
    assert "{ address: 127.0.0.1, port_value: 9901 }" in rendered
    assert "--admin-address-path" not in proc.argv


def test_an_instance_left_running_from_older_code_is_started_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = StackConfig.from_env({"MESH_RUN_DIR": str(tmp_path)})
    code = tmp_path / "todo_service.py"
    code.write_text("VERSION = 1\n")
    monkeypatch.setattr(mesh, "service", lambda cfg, svc, n: replace(sleeper(f"{svc}-{n}"), sources=(code,)))
    try:
        stack.scale(cfg, "todo", 1, wait=False)
        first = running(cfg.run_dir)["todo-0"]
        stack.scale(cfg, "todo", 1, wait=False)
        assert running(cfg.run_dir)["todo-0"] == first  # the same code: reused
        code.write_text("VERSION = 2\n")  # an edit, with the stack left up
        stack.scale(cfg, "todo", 1, wait=False)
        assert running(cfg.run_dir)["todo-0"] != first
        assert not alive(first)
    finally:
        for name in running(cfg.run_dir):
            stop(cfg.run_dir, name)


def test_an_envoy_left_running_from_an_older_config_is_started_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = StackConfig.from_env({"MESH_RUN_DIR": str(tmp_path)})
    flush = {"interval": "5s"}  # what an edit of envoy/envoy.native.yaml changes
    real_envoy = mesh.envoy

    def stand_in(cfg: StackConfig) -> Proc:
        # A sleeper in Envoy's place, with the real Envoy's rendered config as its source.
        rendered = real_envoy(cfg, edit=lambda config: config.update(stats_flush_interval=flush["interval"]))
        return replace(sleeper("envoy"), sources=rendered.sources)

    monkeypatch.setattr(mesh, "envoy", stand_in)
    try:
        start(cfg.run_dir, stack.current_envoy(cfg))
        first = running(cfg.run_dir)["envoy"]
        stack.current_envoy(cfg)
        assert running(cfg.run_dir).get("envoy") == first  # the same config: kept
        flush["interval"] = "10s"  # an edit, with the stack left up
        stack.current_envoy(cfg)
        assert "envoy" not in running(cfg.run_dir)  # stopped, for `up` to start anew
        assert not alive(first)
    finally:
        for name in running(cfg.run_dir):
            stop(cfg.run_dir, name)
