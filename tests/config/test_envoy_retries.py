"""Which requests Envoy sends to another gateway when the first closes the
connection without answering (as one does that is scaled down or stopping):
exactly those the gateway itself would repeat; and that the client still
gets the second gateway's answer when both took as long as they may."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from devstack.config import StackConfig

from .envoy_config import catch_all_route, seconds
from .envoy_run import StandIns, config_for, fetch, running_envoy, stand_in_gateways
from .gateway_deadline import GATEWAY_DEADLINE_S

GATEWAY_IPS = ["127.0.0.2", "127.0.0.3"]


class _ClosingGateway(BaseHTTPRequestHandler):
    """Reads a request whole, then closes without a word the first time it sees the request's id; answers after."""

    seen: dict[str, str] = {}  # request id -> the address that closed on it
    attempts: dict[str, int] = {}  # request id -> attempts that reached a stand-in
    lock = threading.Lock()

    def _handle(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        request_id = self.headers["x-request-id"]
        assert isinstance(self.server, ThreadingHTTPServer)  # a TCP server: its address is (host, port)
        me = str(self.server.server_address[0])
        with self.lock:
            self.attempts[request_id] = self.attempts.get(request_id, 0) + 1
            first = request_id not in self.seen
            if first:
                self.seen[request_id] = me
        if first:
            self.close_connection = True  # no status line: Envoy sees the connection end
            return
        body = b"{}"
        self.send_response(200)
        self.send_header("x-instance", me)
        self.send_header("x-closed-by", self.seen[request_id])
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_OPTIONS = do_PUT = do_DELETE = do_POST = do_PATCH = _handle

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def closing_gateways(infra: StackConfig) -> Iterator[StandIns]:
    _ClosingGateway.seen.clear()
    _ClosingGateway.attempts.clear()
    with stand_in_gateways(infra.consul_url, _ClosingGateway, GATEWAY_IPS) as stand_ins:
        yield stand_ins


REPEATED = [
    ("GET", "/api/v1/todos", {}),
    ("HEAD", "/api/v1/todos", {}),
    ("OPTIONS", "/api/v1/todos", {}),
    ("PUT", "/api/v1/todos/1", {}),
    ("DELETE", "/api/v1/todos/1", {}),
    # The todo-service answers a repeat of this key from what it stored.
    ("POST", "/api/v1/todos", {"idempotency-key": "k-1"}),
    ("POST", "/api/v1/todos?source=app", {"idempotency-key": "k-5"}),  # the path is the same
]
NOT_REPEATED = [
    ("POST", "/api/v1/todos", {}),
    ("PATCH", "/api/v1/todos/1", {}),
    ("PATCH", "/api/v1/todos/1", {"idempotency-key": "k-2"}),
    # No service deduplicates these by key: a repeat could act twice.
    ("POST", "/api/v1/users", {"idempotency-key": "k-3"}),
    ("POST", "/api/v1/todos/1/complete", {"idempotency-key": "k-4"}),
    ("POST", "/api/v1/todos/", {"idempotency-key": "k-6"}),  # another path, to the gateway too
]


def test_a_reset_is_retried_on_another_gateway_only_where_repeating_is_harmless(
    closing_gateways: StandIns, infra: StackConfig, tmp_path: Path
) -> None:
    config = tmp_path / "envoy.native.rendered.yaml"
    config.write_text(config_for(closing_gateways, infra.ports.consul_dns, tmp_path / "access.log"))
    with running_envoy(config) as process:
        process.wait_for_hosts({f"{ip}:{closing_gateways.port}" for ip in GATEWAY_IPS})
        outcomes = {}
        for method, path, headers in REPEATED + NOT_REPEATED:
            body = b"{}" if method in ("POST", "PUT", "PATCH") else None
            status, answer_headers, answer = fetch(f"{process.public}{path}", headers, body=body, method=method)
            request_id = answer_headers["x-request-id"]
            outcomes[(method, path, *headers.values())] = (status, _ClosingGateway.attempts.get(request_id))
            if status == 200:
                assert answer_headers["x-instance"] != answer_headers["x-closed-by"], (method, path)
            if status == 502:
                # Sent, and not answered: it may have been carried out. Nothing
                # tells the client to send it again.
                assert (json.loads(answer)["code"], json.loads(answer)["status"]) == ("GATEWAY_OUTCOME_UNKNOWN", 502)
                assert "retry-after" not in answer_headers

    assert outcomes == {
        **{(method, path, *headers.values()): (200, 2) for method, path, headers in REPEATED},
        **{(method, path, *headers.values()): (502, 1) for method, path, headers in NOT_REPEATED},
    }


# The route's idle timeout and the gateways' deadline, both scaled by this, so
# that two deadlines' worth of silence takes seconds, not half a minute.
SCALE = 0.2


class _SlowGateway(BaseHTTPRequestHandler):
    """Holds a request for its whole deadline, scaled; then closes on it the first time, and answers the second."""

    seen: dict[str, str] = {}  # request id -> the address that closed on it
    lock = threading.Lock()

    def do_GET(self) -> None:
        request_id = self.headers["x-request-id"]
        assert isinstance(self.server, ThreadingHTTPServer)
        me = str(self.server.server_address[0])
        with self.lock:
            first = request_id not in self.seen
            if first:
                self.seen[request_id] = me
        time.sleep(SCALE * GATEWAY_DEADLINE_S)  # a gateway at its deadline, to the end
        if first:
            self.close_connection = True  # crashed, or cut off by its shutdown
            return
        self.send_response(200)
        self.send_header("x-instance", me)
        self.send_header("x-closed-by", self.seen[request_id])
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_retry_on_a_second_gateway_is_waited_for_to_its_deadline(
    infra: StackConfig, native: dict[str, Any], tmp_path: Path
) -> None:
    _SlowGateway.seen.clear()
    route_idle_s = seconds(catch_all_route(native)["route"]["idle_timeout"])
    with stand_in_gateways(infra.consul_url, _SlowGateway, GATEWAY_IPS) as slow:
        config = tmp_path / "envoy.native.rendered.yaml"
        rendered = config_for(slow, infra.ports.consul_dns, tmp_path / "access.log", route_idle_s=SCALE * route_idle_s)
        config.write_text(rendered)
        with running_envoy(config) as process:
            process.wait_for_hosts({f"{ip}:{slow.port}" for ip in GATEWAY_IPS})
            sent = time.monotonic()
            status, headers, body = fetch(f"{process.public}/api/v1/todos", timeout=SCALE * route_idle_s + 5)
            took = time.monotonic() - sent

    # With 15 s (one gateway's deadline and a little), Envoy gave the client its
    # own 504 while the second gateway was still within its deadline.
    assert status == 200, body
    assert headers["x-instance"] != headers["x-closed-by"]
    assert took >= 2 * SCALE * GATEWAY_DEADLINE_S  # the silence was two gateways' whole deadlines
