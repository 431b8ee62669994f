"""What the stack runner's tests share: stand-ins for the stack's processes, and ports."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from devstack.pidfile import alive
from devstack.procs import Proc

SLEEP = "import time; time.sleep(60)"


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
