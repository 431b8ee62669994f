"""The stack runner's HTTP calls reach our loopback ports whatever proxy the environment names."""

from __future__ import annotations

from pathlib import Path

import pytest

from devstack import rabbitmq
from devstack.config import StackConfig

from .conftest import Quiet, serving, unused_port


def test_a_suites_virtual_host_is_made_past_an_http_proxy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # CI's runner, or a developer's shell, may name a proxy for the outside world.
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{unused_port()}")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    calls: list[str] = []

    class Management(Quiet):
        """RabbitMQ's management API, as far as making a virtual host goes."""

        def do_PUT(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            calls.append(self.path)
            self.send_response(201)
            self.send_header("Content-Length", "0")
            self.end_headers()

    with serving(Management) as port:
        env = {"MESH_RUN_DIR": str(tmp_path), "MESH_PORT_RABBITMQ_MANAGEMENT": str(port)}
        cfg = StackConfig.from_env(env, profile="test")
        assert rabbitmq.vhost(cfg, "suite") == f"amqp://guest:guest@127.0.0.1:{cfg.ports.amqp}/suite"
    assert calls == ["/api/vhosts/suite", "/api/permissions/suite/guest"]
