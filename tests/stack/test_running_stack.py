"""Commands on a stack that runs already, or that another command is changing: they keep it as it is, or refuse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import fields
from pathlib import Path

import pytest

from devstack import cli, infra, lock, mesh, rabbitmq, stack
from devstack.config import ROOT, SERVICES, Ports, StackConfig, port_variable
from devstack.pidfile import alive
from devstack.procs import Proc, log_path, running, start, stop

from .conftest import Quiet, serving, sleeper, unused_port

# `devstack COMMAND...` whose parts are stand-ins: `up` starts one process
# and then runs THEN; a service instance does nothing; nothing waits long.
DEVSTACK = """
import sys, time
from devstack import cli, mesh, procs, stack

def stand_in(name):
    return procs.Proc(name, [sys.executable, "-c", "import time; time.sleep(60)"], env={{}})

def up(cfg):
    procs.start(cfg.run_dir, stand_in("redis"))
    {then}

stack.up = up
mesh.service = lambda cfg, svc, n: stand_in(f"{{svc}}-{{n}}")
stack.READY_TIMEOUT = 2.0
sys.exit(cli.main(sys.argv[1:]))
"""


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT / "scripts"),
        "MESH_RUN_DIR": str(tmp_path),
        # Nothing of a developer's: `down` stops the epmd on its port, and
        # `scale` waits for Consul on this one.
        "MESH_PORT_EPMD": str(unused_port()),
        "MESH_PORT_CONSUL_HTTP": str(unused_port()),
    }


def _devstack(tmp_path: Path, *command: str, then: str = "pass") -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", DEVSTACK.format(then=then), *command],
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stop_all(run_dir: Path) -> None:
    for name in running(run_dir):
        stop(run_dir, name)


def test_a_command_while_an_up_starts_the_stack_is_refused_at_once_and_names_it(tmp_path: Path) -> None:
    # Two at once both found the ports free and started everything; the
    # second's pid files hid the first's processes from `down` for good.
    run_dir = tmp_path / "dev"
    first = _devstack(tmp_path, "up", then="print('started', flush=True); time.sleep(60)")
    try:
        assert first.stdout is not None
        assert any(line.startswith("started") for line in first.stdout)
        stand_in = running(run_dir)["redis"]
        for command in (["up", "--detach"], ["scale", "todo", "2"], ["down"]):
            second = _devstack(tmp_path, *command)
            out, err = second.communicate(timeout=30)
            assert second.returncode == 1, (command, out, err)
            assert err.startswith(f"error: `up` (pid {first.pid}) is at work on the stack in {run_dir}:"), err
            assert running(run_dir) == {"redis": stand_in}
        first.terminate()  # and it stops what it started, as ever
        assert first.wait(timeout=30) != 0
        assert running(run_dir) == {} and not alive(stand_in)
    finally:
        first.kill()
        first.communicate()
        _stop_all(run_dir)


def test_an_up_on_a_stack_that_runs_starts_what_is_missing_and_returns(tmp_path: Path) -> None:
    # It stayed in the foreground, and its Ctrl-C stopped the whole stack,
    # what another terminal's `up` had started as well.
    run_dir = tmp_path / "dev"
    start(run_dir, sleeper("postgres"))
    try:
        second = _devstack(tmp_path, "up")
        out, err = second.communicate(timeout=30)
        assert second.returncode == 0, err
        assert "It ran before this `up`, which leaves it running: `task down` stops it." in out
        assert set(running(run_dir)) == {"postgres", "redis"}
    finally:
        _stop_all(run_dir)


# An instance as far as Consul's check goes: it listens, and prints where.
LISTENER = (
    "import socket, time; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen();"
    " print(s.getsockname()[1], flush=True); time.sleep(60)"
)


def test_an_up_without_counts_keeps_the_instances_that_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `task up` renders a count left out as "", which meant 1: after
    # `task scale SERVICE=todo N=3`, the next `task up` stopped two of them.
    run_dir = tmp_path / "dev"

    class ConsulAndEnvoy(Quiet):
        """Consul's passing todo-service instances (those running, where they listen); Envoy's JWKS."""

        def do_GET(self) -> None:
            entries = []
            if self.path == "/v1/health/service/todo-service?passing":
                for name in running(run_dir):
                    # Its last line: a log goes on across restarts.
                    if name.startswith("todo-") and (said := log_path(run_dir, name).read_text().split()):
                        entries.append({"Service": {"Address": "127.0.0.1", "Port": int(said[-1])}})
            body = json.dumps(entries if self.path.startswith("/v1/") else {"keys": []}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    monkeypatch.setattr(stack, "up_infra", lambda cfg: None)
    monkeypatch.setattr(
        mesh, "service", lambda cfg, svc, n: Proc(f"{svc}-{n}", [sys.executable, "-c", LISTENER], env={})
    )
    # The Envoy `up` would start is the one running: kept, as the instances are.
    monkeypatch.setattr(mesh, "envoy", lambda cfg: sleeper("envoy"))
    with serving(ConsulAndEnvoy) as port:
        # The todo-service's count left out, as `task up` renders it; none of the others.
        counts = {f"MESH_{svc.upper()}_INSTANCES": "" if svc == "todo" else "0" for svc in (*SERVICES, "gateway")}
        env = {"MESH_RUN_DIR": str(tmp_path), **counts}
        cfg = StackConfig.from_env({**env, "MESH_PORT_CONSUL_HTTP": str(port), "MESH_PORT_ENVOY": str(port)})
        try:
            start(run_dir, sleeper("envoy"))
            stack.scale(cfg, "todo", 3)  # what `task scale SERVICE=todo N=3` does
            scaled = running(run_dir)
            stack.up(cfg)
            assert running(run_dir) == scaled
            stack.scale(cfg, "todo", 0)
            stack.up(cfg)  # none runs: one, as ever
            assert sorted(running(run_dir)) == ["envoy", "todo-0"]
        finally:
            _stop_all(run_dir)


def _stand_in_infrastructure(monkeypatch: pytest.MonkeyPatch) -> None:
    """`up --infra-only` whose parts are stand-ins, ready at once."""
    for module, part in ((infra, "consul"), (infra, "postgres"), (infra, "redis"), (infra, "mailsink")):
        monkeypatch.setattr(module, part, lambda cfg, name=part: sleeper(name))
    monkeypatch.setattr(rabbitmq, "server", lambda cfg: sleeper("rabbitmq"))
    monkeypatch.setattr(infra, "create_databases", lambda cfg: None)
    monkeypatch.setattr(stack, "ready", lambda *args, **kwargs: None)


def test_an_up_asking_for_other_ports_than_the_running_stacks_is_refused_and_names_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The running Envoy and infrastructure are reused as they are: what
    # `MESH_PORT_ENVOY=9080 task up` started waited 90 s for them, then failed.
    _stand_in_infrastructure(monkeypatch)
    monkeypatch.setenv("MESH_RUN_DIR", str(tmp_path))
    for f in fields(Ports):
        monkeypatch.setenv(port_variable(f.name), str(unused_port()))
    run_dir = tmp_path / "dev"
    try:
        assert cli.main(["up", "--infra-only", "--detach"]) == 0
        started = running(run_dir)
        envoy_port, other = os.environ["MESH_PORT_ENVOY"], str(unused_port())
        monkeypatch.setenv("MESH_PORT_ENVOY", other)
        capsys.readouterr()
        assert cli.main(["up", "--infra-only", "--detach"]) == 1
        said = capsys.readouterr().err
        asked = f"envoy on {other} (it runs on {envoy_port}; MESH_PORT_ENVOY)"
        assert f"runs on other ports than this asks for: {asked}" in said, said
        assert running(run_dir) == started  # refused, it stopped nothing either
        # Once the stack is down, its next start may take other ports.
        assert cli.main(["down"]) == 0
        assert cli.main(["up", "--infra-only", "--detach"]) == 0
    finally:
        _stop_all(run_dir)


def test_a_teardown_waits_for_the_stacks_lock_a_bounded_time(tmp_path: Path) -> None:
    # A foreground `up` tears down deaf to signals; a blocking wait for a
    # holder suspended with Ctrl-Z kept it so until SIGKILL.
    outcome: list[BaseException | None] = []

    def teardown() -> None:
        try:
            with lock.held(tmp_path, "down", wait=0.5):
                outcome.append(None)
        except BaseException as exc:  # what ended the wait is the result
            outcome.append(exc)

    with lock.held(tmp_path, "scale todo 3"):
        waiter = threading.Thread(target=teardown, daemon=True)
        waiter.start()
        waiter.join(timeout=10)
        assert not waiter.is_alive(), "the wait for the lock did not end"
    assert len(outcome) == 1 and isinstance(outcome[0], lock.Busy)
    assert "`scale todo 3`" in str(outcome[0])

    # And one that is let go within the wait is taken.
    with lock.held(tmp_path, "scale todo 3"):
        waiter = threading.Thread(target=teardown, daemon=True)
        outcome.clear()
        waiter.start()
    waiter.join(timeout=10)
    assert outcome == [None]
