"""A port the stack wants and cannot have is refused before anything starts, with a way out."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest

from devstack import rabbitmq, stack
from devstack.config import TEST_PORTS, Ports, StackConfig
from devstack.ports import require_free
from devstack.procs import StackError, running

from .conftest import unused_port


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
