"""A port the stack wants and cannot have is refused before anything starts, with a way out."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import fields, replace
from pathlib import Path

import pytest
import yaml

from devstack import cli, rabbitmq, stack
from devstack.config import ROOT, TEST_PORTS, Ports, StackConfig, port_variable
from devstack.ports import record, require_free
from devstack.procs import StackError, running, start, stop

from .conftest import Quiet, serving, sleeper, unused_port


def _unused_ports() -> Ports:
    return Ports(**{f.name: unused_port() for f in fields(Ports)})


def test_a_taken_port_is_a_clear_error() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        # Which process holds it, so that a stack a killed run left behind can be found and stopped.
        held_by = rf"held by pid {os.getpid()}: \S*python"
        with pytest.raises(StackError, match=rf"ports already in use: redis \({port}, {held_by}.*\).*MESH_PORT_"):
            require_free({"redis": port})


def test_ports_come_from_the_environment() -> None:
    ports = Ports().overridden({"MESH_PORT_ENVOY": "9080"})
    assert ports.envoy == 9080 and ports.consul_http == 8500


def test_dev_and_test_ports_never_collide() -> None:
    dev = set(vars(Ports()).values())
    test = set(vars(TEST_PORTS).values())
    assert not dev & test
    assert len(test) == len(vars(TEST_PORTS))


@pytest.mark.parametrize("name", ["consul_server", "consul_serf_wan"])
def test_consuls_other_fixed_ports_are_checked_too(tmp_path: Path, name: str) -> None:
    # Taken, Consul exited at start, and said why only in its log.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        cfg = StackConfig(
            name="unit", run_dir=tmp_path, ports=replace(_unused_ports(), **{name: holder.getsockname()[1]})
        )
        try:
            with pytest.raises(
                StackError, match=rf"ports already in use: {name.replace('_', ' ')} .*MESH_PORT_{name.upper()}="
            ):
                stack.up_infra(cfg)
            assert running(tmp_path) == {}
        finally:
            stack.down(cfg)


def test_the_epmd_port_held_by_anything_but_an_epmd_is_refused(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        cfg = StackConfig(name="unit", run_dir=tmp_path, ports=replace(_unused_ports(), epmd=port))
        held_by = rf"held by pid {os.getpid()}: \S*python"
        with pytest.raises(
            StackError, match=rf"port {port} \(epmd, for RabbitMQ\) is already in use, {held_by}.*MESH_PORT_EPMD="
        ):
            rabbitmq.require_epmd_port(cfg)


def test_an_epmd_on_the_epmd_port_is_welcome(tmp_path: Path) -> None:
    # One left by a stack before, or another node's: RabbitMQ registers with it.
    port = unused_port()
    epmd = tmp_path / "epmd"
    epmd.symlink_to(sys.executable)
    listen = (
        f"import socket, time; s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen();"
        " print(flush=True); time.sleep(60)"
    )
    with subprocess.Popen([str(epmd), "-c", listen], stdout=subprocess.PIPE) as stand_in:
        try:
            assert stand_in.stdout is not None and stand_in.stdout.readline() == b"\n"
            rabbitmq.require_epmd_port(StackConfig(name="unit", run_dir=tmp_path, ports=replace(TEST_PORTS, epmd=port)))
        finally:
            stand_in.kill()


# After `MESH_PORT_AMQP=5673 task up`, the commands after it, in a shell
# without that variable, went to the default ports: to nothing, or to
# another stack there.
@pytest.fixture
def started_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A dev stack that runs (a stand-in) on ports of its own, asked about from a shell on others."""
    monkeypatch.setenv("MESH_RUN_DIR", str(tmp_path))
    run_dir = tmp_path / "dev"
    record(run_dir, _unused_ports())
    start(run_dir, sleeper("redis"))
    for f in fields(Ports):
        monkeypatch.setenv(port_variable(f.name), str(unused_port()))
    yield run_dir
    for name in running(run_dir):
        stop(run_dir, name)


def _recorded(run_dir: Path) -> Ports:
    return Ports(**json.loads((run_dir / "ports.json").read_text()))


def test_ps_asks_the_consul_of_the_ports_the_stack_runs_on(
    started_elsewhere: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    class Consul(Quiet):
        def do_GET(self) -> None:
            entries = [{"Service": {"ID": "todo-service-1"}, "Checks": [{"Status": "passing"}]}]
            body = json.dumps(entries if self.path == "/v1/health/service/todo-service" else []).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with serving(Consul) as port:
        record(started_elsewhere, replace(_recorded(started_elsewhere), consul_http=port))
        assert cli.main(["ps"]) == 0
    assert "todo-service-1" in capsys.readouterr().out


def test_down_stops_the_epmd_of_the_ports_the_stack_ran_on(
    started_elsewhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stopped: list[int] = []
    monkeypatch.setattr(rabbitmq, "stop_epmd", lambda cfg: stopped.append(cfg.ports.epmd))
    assert cli.main(["down"]) == 0
    assert stopped == [_recorded(started_elsewhere).epmd]


def test_task_dlq_goes_to_the_broker_of_the_ports_the_stack_runs_on(started_elsewhere: Path) -> None:
    tasks = yaml.safe_load((ROOT / "Taskfile.yml").read_text())["tasks"]
    env = {name: value for name, value in os.environ.items() if name != "AMQP_URL"}
    for task in ("dlq", "dlq:replay"):
        script = tasks[task]["env"]["AMQP_URL"]["sh"]
        url = subprocess.run(["sh", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        assert url.stdout.strip() == f"amqp://guest:guest@127.0.0.1:{_recorded(started_elsewhere).amqp}/", task
