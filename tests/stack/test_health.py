"""What `scale` waits for: Consul's passing entries, each one of the instances that run."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from devstack import mesh, stack
from devstack.config import TEST_PORTS, StackConfig
from devstack.procs import Hopeless, Proc, StackError, log_path, running, stop, wait_until

from .conftest import Quiet, serving, unused_port

# An instance as far as Consul's check goes: it listens, and prints where.
LISTENER = (
    "import socket, time; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen();"
    " print(s.getsockname()[1], flush=True); time.sleep(60)"
)


def _answer(handler: Quiet, entries: list[dict[str, Any]]) -> None:
    body = json.dumps(entries).encode()
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def test_a_killed_instances_entry_still_passing_is_not_taken_for_a_running_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Until its next check fails, a killed instance's entry passes: counted, it
    # made `scale` return before the instance that replaced it passed at all.
    entries: list[dict[str, Any]] = []

    class Consul(Quiet):
        def do_GET(self) -> None:
            assert self.path == "/v1/health/service/todo-service?passing"
            _answer(self, entries)

    monkeypatch.setattr(
        mesh, "service", lambda cfg, svc, n: Proc(f"{svc}-{n}", [sys.executable, "-c", LISTENER], env={})
    )
    monkeypatch.setattr(stack, "READY_TIMEOUT", 2.0)
    with serving(Consul) as consul_port:
        cfg = StackConfig(name="unit", run_dir=tmp_path, ports=replace(TEST_PORTS, consul_http=consul_port))
        try:
            stack.scale(cfg, "todo", 1, wait=False)
            wait_until(lambda: log_path(tmp_path, "todo-0").read_text(), timeout=10, what="its port")
            port = int(log_path(tmp_path, "todo-0").read_text())
            entries[:] = [{"Service": {"Address": "127.0.0.1", "Port": unused_port()}}]  # the killed one's
            with pytest.raises(StackError, match=r"timed out .*; see .*/logs/todo-\*\.log$"):
                stack.scale(cfg, "todo", 1)
            entries[:] = [{"Service": {"Address": "127.0.0.1", "Port": port}}]
            monkeypatch.setattr(stack, "READY_TIMEOUT", 30.0)  # short only where it is meant to run out
            stack.scale(cfg, "todo", 1)
        finally:
            for name in running(tmp_path):
                stop(tmp_path, name)


def test_up_says_at_once_that_envoy_exited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # It waited READY_TIMEOUT (90 s) for the API through an Envoy that had exited.
    class Consul(Quiet):
        def do_GET(self) -> None:
            _answer(self, [])  # no instances to wait for

    monkeypatch.setattr(stack, "up_infra", lambda cfg: None)
    monkeypatch.setattr(mesh, "envoy", lambda cfg: Proc("envoy", [sys.executable, "-c", "raise SystemExit(1)"], env={}))
    with serving(Consul) as consul_port:
        ports = replace(TEST_PORTS, consul_http=consul_port, envoy=unused_port(), envoy_admin=unused_port())
        instances = dict.fromkeys(("user", "todo", "notification", "gateway"), 0)
        cfg = StackConfig(name="unit", run_dir=tmp_path, ports=ports, instances=instances)
        began = time.monotonic()
        try:
            with pytest.raises(Hopeless, match=r"envoy exited; see .*/logs/envoy\.log"):
                stack.up(cfg)
            assert time.monotonic() - began < 15
        finally:
            for name in running(tmp_path):
                stop(tmp_path, name)
