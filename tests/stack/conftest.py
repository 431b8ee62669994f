"""What the stack runner's tests share: stand-ins for the stack's processes, ports, and test stacks of their own."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from devstack import infra, rabbitmq, stack
from devstack.config import ROOT, Ports, StackConfig, port_variable
from devstack.pidfile import alive
from devstack.procs import Proc, running, stop

SLEEP = "import time; time.sleep(60)"
INFRA = set(stack.INFRA)

# A test session (argv[1]: "test session", "benchmark") in a process of its
# own, its infrastructure stand-ins: it says when it has its turn, then holds
# on until its stdin closes.
SESSION = """
import sys
from devstack import infra, rabbitmq, sessions, stack
from devstack.config import StackConfig
from devstack.procs import Proc

def stand_in(name):
    return Proc(name, [sys.executable, "-c", "import time; time.sleep(60)"], env={})

for part in ("consul", "postgres", "redis", "mailsink"):
    setattr(infra, part, lambda cfg, name=part: stand_in(name))
rabbitmq.server = lambda cfg: stand_in("rabbitmq")
infra.create_databases = lambda cfg: None
stack.ready = lambda *args, **kwargs: None
with sessions.session(StackConfig.from_env(profile="test"), sys.argv[1]):
    print("joined", flush=True)
    sys.stdin.read()
"""


def sleeper(name: str) -> Proc:
    """A stand-in for one of the stack's processes: does nothing for a minute."""
    return Proc(name, [sys.executable, "-c", SLEEP], env={})


def group(pgid: int) -> list[str]:
    """Live members of a process group (a zombie is dead, waiting for init to reap it)."""
    members = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout.split()
    return [pid for pid in members if alive(int(pid))]


def unused_port() -> int:
    """A loopback port that nothing listens on (as long as no one takes it meanwhile)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Quiet(BaseHTTPRequestHandler):
    """A fake server's handler that logs nothing."""

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[int]:
    """A fake server on loopback, for the duration: its port."""
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        try:
            yield server.server_port
        finally:
            server.shutdown()
            thread.join()


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A test stack of its own: its run directory, and ports nothing holds (the shared test stack's are taken)."""
    return {
        "MESH_RUN_DIR": str(tmp_path),
        **{port_variable(f.name): str(unused_port()) for f in fields(Ports)},
    }


@pytest.fixture
def cfg(env: dict[str, str]) -> Iterator[StackConfig]:
    cfg = StackConfig.from_env(env, profile="test")
    yield cfg
    for name in running(cfg.run_dir):
        stop(cfg.run_dir, name)


@pytest.fixture
def stand_ins(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The infrastructure's parts as stand-ins, ready at once: the names of those started, in order."""
    started: list[str] = []

    def part(name: str) -> Proc:
        started.append(name)
        return sleeper(name)

    for module, name in ((infra, "consul"), (infra, "postgres"), (infra, "redis"), (infra, "mailsink")):
        monkeypatch.setattr(module, name, lambda cfg, name=name: part(name))
    monkeypatch.setattr(rabbitmq, "server", lambda cfg: part("rabbitmq"))
    monkeypatch.setattr(infra, "create_databases", lambda cfg: None)
    monkeypatch.setattr(stack, "ready", lambda *args, **kwargs: None)
    return started


def session_process(env: dict[str, str], what: str = "test session") -> subprocess.Popen[str]:
    """Another run's session, started: it prints "joined" once it has its turn."""
    return subprocess.Popen(
        [sys.executable, "-c", SESSION, what],
        env={**os.environ, **env, "PYTHONPATH": str(ROOT / "scripts")},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@contextlib.contextmanager
def other_session(env: dict[str, str], what: str = "test session") -> Iterator[subprocess.Popen[str]]:
    """Another run's session, in its turn, for the block (or until the test ends or kills it)."""
    child = session_process(env, what)
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "joined\n", child.stderr.read() if child.stderr else ""
        yield child
    finally:
        child.kill()
        child.communicate(timeout=30)
