"""The stack runner's HTTP calls reach our loopback ports whatever proxy the environment names."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from devstack import rabbitmq
from devstack.config import StackConfig

from .conftest import unused_port


def test_a_suites_virtual_host_is_made_past_an_http_proxy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # CI's runner, or a developer's shell, may name a proxy for the outside world.
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{unused_port()}")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    calls: list[str] = []

    class Management(BaseHTTPRequestHandler):
        """RabbitMQ's management API, as far as making a virtual host goes."""

        def do_PUT(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            calls.append(self.path)
            self.send_response(201)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Management) as server:
        serving = threading.Thread(target=server.serve_forever)
        serving.start()
        try:
            env = {"MESH_RUN_DIR": str(tmp_path), "MESH_PORT_RABBITMQ_MANAGEMENT": str(server.server_port)}
            cfg = StackConfig.from_env(env, profile="test")
            assert rabbitmq.vhost(cfg, "suite") == f"amqp://guest:guest@127.0.0.1:{cfg.ports.amqp}/suite"
        finally:
            server.shutdown()
            serving.join()
    assert calls == ["/api/vhosts/suite", "/api/permissions/suite/guest"]
