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


def test_nothing_calls_loopback_through_urllibs_default_opener() -> None:
    # The default opener honours http_proxy, so a test helper using it fails
    # for a developer whose shell names a proxy (CI's .ci/run sets no_proxy,
    # which would hide it). devstack.loopback.DIRECT is the way.
    root = Path(__file__).resolve().parents[2]
    offenders = [
        f"{path.relative_to(root)}:{number}"
        for top in ("services", "gateway", "tests", "scripts")
        for path in (root / top).rglob("*.py")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if "urlopen(" in line and path != Path(__file__).resolve()
    ]
    assert offenders == []
