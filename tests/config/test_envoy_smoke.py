"""A short smoke run of the rendered native config against the test Consul's
DNS and stand-in gateway instances, because validate mode never resolves DNS,
binds ports or proxies a request."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack.config import StackConfig

from .conftest import REPO_ROOT
from .envoy_config import client_bucket, local_rate_limit
from .envoy_run import StandIns, config_for, edited, fetch, running_envoy, stand_in_gateways

# --------------------------------------------------------------------------
# smoke run: native config, the real Consul's DNS, two stand-in gateways, one dead one

GATEWAY_IPS = ["127.0.0.2", "127.0.0.3"]
DEAD_GATEWAY_IP = "127.0.0.4"  # in DNS, but nothing listens: connect-failure
# The routes' idle timeout, shortened from their 30 s so that a gateway's
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


@pytest.fixture
def fake_mesh(infra: StackConfig) -> Iterator[StandIns]:
    """Stand-in gateways on two loopback addresses, and a dead third, all in Consul under a name of this test's own."""
    _FakeGateway.paths.clear()
    _FakeGateway.posts = 0
    with stand_in_gateways(infra.consul_url, _FakeGateway, GATEWAY_IPS, DEAD_GATEWAY_IP) as stand_ins:
        yield stand_ins


def compose_envoy_healthcheck() -> list[str]:
    compose = yaml.safe_load((REPO_ROOT / "compose.yml").read_text())
    test: list[str] = compose["services"]["envoy"]["healthcheck"]["test"]
    return test


def test_native_config_serves_traffic(fake_mesh: StandIns, infra: StackConfig, tmp_path: Path) -> None:
    access_log = tmp_path / "access.log"
    config = tmp_path / "envoy.native.rendered.yaml"
    config.write_text(config_for(fake_mesh, infra.ports.consul_dns, access_log, route_idle_s=SILENT_ROUTE_IDLE_S))

    with running_envoy(config) as process:
        public = process.public
        process.wait_for_hosts({f"{ip}:{fake_mesh.port}" for ip in [*GATEWAY_IPS, DEAD_GATEWAY_IP]})

        # A caller's request id is replaced at the edge, whatever it looks
        # like: the one the client gets back is the one the gateway was given.
        client_ids = ("rid-from-client", "order 42", "0190c8a2-7d3e-7b4a-9f00-0123456789ab")
        for client_id in client_ids:
            status, headers, body = fetch(f"{public}/todos", {"x-request-id": client_id})
            assert status == 200
            assert json.loads(body)["x-request-id"] == headers.get("x-request-id") != client_id
        edge_id = headers["x-request-id"]

        # Without one, Envoy mints an id and hands the same one to both sides.
        # Requests landing on the dead instance are retried on a live one, so
        # the client never sees the failure.
        served_by = set()
        for _ in range(12):
            status, headers, body = fetch(f"{public}/todos")
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
        status, _, _ = fetch(f"{public}/todos", retry_me, body=b"{}")
        assert (status, _FakeGateway.posts) == (503, 1)
        assert json.loads(fetch(f"{public}/todos")[2])["x-envoy-internal"] is None

        # A client's x-envoy-original-path neither reaches the gateway nor
        # stands in for the path in the access log.
        status, _, body = fetch(f"{public}/todos", {"x-envoy-original-path": "/forged"})
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
            status, headers, body = fetch(f"{public}{probe}")
            assert status == 404, probe
            assert headers.get("content-type") == "application/problem+json"
            assert json.loads(body)["code"] == "NOT_FOUND"
        assert not {"/ready", "/health", "/health/live"} & set(_FakeGateway.paths)

        # A gateway that says nothing for longer than the route allows is a
        # gateway timeout, not the client's fault (a 408 would invite a resend).
        status, headers, body = fetch(f"{public}/silent")
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
    # A gateway name nobody registered: no instance to send to.
    nobody = StandIns(f"nobody-{uuid.uuid4().hex[:8]}", 8000)
    rendered = config_for(nobody, infra.ports.consul_dns, tmp_path / "access.log")

    # And a client's bucket of ten requests that does not refill during the
    # test, under a ceiling of a hundred: the 429 is the client's bucket (its
    # descriptor matched what the action made of the address), not the ceiling.
    def ten_an_hour(cfg: dict[str, Any]) -> None:
        local_rate_limit(cfg)["token_bucket"].update(max_tokens=100, tokens_per_fill=100, fill_interval="3600s")
        client_bucket(cfg).update(max_tokens=10, tokens_per_fill=10, fill_interval="3600s")

    config = tmp_path / "envoy.yaml"
    config.write_text(edited(rendered, ten_an_hour))

    with running_envoy(config) as process:
        public = process.public
        # Ready, and with no gateway at all: else its 503s below could be a
        # not-yet-ready Envoy's, not the ones asked for.
        process.wait_for_hosts(set())

        answers = [fetch(f"{public}/api/v1/todos") for _ in range(3)]
        # What the gateway's HTTP parser would answer with bare text: a body
        # in a coding it cannot read, and an expectation it does not know.
        for encoding in ("br", "gzip, deflate"):
            answers.append(fetch(f"{public}/api/v1/todos", {"Content-Encoding": encoding}, body=b"{}"))
        answers.append(fetch(f"{public}/api/v1/todos", {"Expect": "200-ok"}))
        # A coding it reads goes on to the gateway (there is none), and so
        # do empty lists, which HTTP allows.
        for encoding in (" GZIP ", "identity", ""):
            answers.append(fetch(f"{public}/api/v1/todos", {"Content-Encoding": encoding}, body=b"{}"))
        answers.append(fetch(f"{public}/api/v1/todos", {"Expect": ""}))
        answers.append(fetch(f"{public}/api/v1/todos"))
        # Malformed HTTP, and headers past Envoy's limit: refused before any filter.
        # 10 kB: past the gateway's limit (8190 bytes a line), under Envoy's
        # default (60 KiB), which let the gateway answer it with a bare 400.
        answers.append(_raw(process.public_port, b"NOT HTTP AT ALL\r\n\r\n"))
        answers.append(_raw(process.public_port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n"))
        answers.append(_raw(process.public_port, b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"))

    expected = [
        (503, "GATEWAY_UNAVAILABLE"),
        (503, "GATEWAY_UNAVAILABLE"),
        (503, "GATEWAY_UNAVAILABLE"),
        (415, "UNSUPPORTED_MEDIA_TYPE"),
        (415, "UNSUPPORTED_MEDIA_TYPE"),
        (417, "EXPECTATION_FAILED"),
        (503, "GATEWAY_UNAVAILABLE"),
        (503, "GATEWAY_UNAVAILABLE"),
        (503, "GATEWAY_UNAVAILABLE"),
        (503, "GATEWAY_UNAVAILABLE"),
        (429, "RATE_LIMITED"),  # the client's bucket is empty
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
        if status == 415:
            assert headers["accept-encoding"] == "gzip, deflate"  # RFC 9110 15.5.16: the codings it takes


def test_a_request_no_gateway_accepted_is_unavailable_not_of_unknown_outcome(
    infra: StackConfig, tmp_path: Path
) -> None:
    # Every gateway in DNS refuses the connection (flag UF): nothing was sent,
    # so even a POST that is not safe to repeat may be sent again. The mapper
    # that makes a cut connection (UC, UR) a 502 without Retry-After must not
    # catch this one too.
    with stand_in_gateways(infra.consul_url, _FakeGateway, [], DEAD_GATEWAY_IP) as refusing:
        config = tmp_path / "envoy.yaml"
        config.write_text(config_for(refusing, infra.ports.consul_dns, tmp_path / "access.log"))
        with running_envoy(config) as process:
            process.wait_for_hosts({f"{DEAD_GATEWAY_IP}:{refusing.port}"})
            answers = [
                fetch(f"{process.public}/api/v1/todos", body=b"{}"),
                fetch(f"{process.public}/api/v1/todos"),
            ]

    for status, headers, body in answers:
        assert status == 503, body
        assert json.loads(body)["code"] == "GATEWAY_UNAVAILABLE"
        assert headers["retry-after"] == "1"
