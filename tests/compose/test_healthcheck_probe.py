"""The images' HEALTHCHECK probe, run here with this Python against a fake /health on loopback.

Docker hands a client's configured proxies (HTTP_PROXY) to every container;
urllib's urlopen sent the probe for 127.0.0.1 through such a proxy, where it
failed, and every container would have turned unhealthy.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from .conftest import APPS, App, dockerfile_instructions, final_stage

PROBE_TIMEOUT = 30  # seconds; the probe's own timeout is 4


def probe(app: App) -> list[str]:
    """The runtime stage's HEALTHCHECK command, as Docker runs it (exec form)."""
    checks = [args for kw, args in final_stage(dockerfile_instructions(app.dockerfile)) if kw == "HEALTHCHECK"]
    assert checks, f"{app.name}: no HEALTHCHECK"
    command = json.loads(checks[-1].split(" CMD ", 1)[1])
    assert isinstance(command, list) and command[0] == "python", command
    return [sys.executable, *command[1:]]


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def health() -> Iterator[tuple[int, list[int]]]:
    """A /health on loopback: its port, and the status it answers with (to change)."""
    status = [200]

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status[0] if self.path == "/health" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Health) as server:
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        try:
            yield server.server_port, status
        finally:
            server.shutdown()
            thread.join()


@pytest.mark.parametrize("app", APPS, ids=repr)
def test_the_probe_goes_straight_to_the_service_whatever_proxy_docker_passes(
    app: App, health: tuple[int, list[int]]
) -> None:
    port, status = health
    proxy = f"http://127.0.0.1:{unused_port()}"  # nothing listens there
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "all_proxy")}
    env |= {"SERVICE_PORT": str(port), "HTTP_PROXY": proxy, "http_proxy": proxy, "ALL_PROXY": proxy}
    passed = subprocess.run(probe(app), env=env, capture_output=True, text=True, timeout=PROBE_TIMEOUT)
    assert passed.returncode == 0, passed.stderr
    # Still a probe: an answer other than 2xx fails it.
    status[0] = 503
    failed = subprocess.run(probe(app), env=env, capture_output=True, text=True, timeout=PROBE_TIMEOUT)
    assert failed.returncode != 0
