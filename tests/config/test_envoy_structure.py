"""Structural checks with PyYAML: the settings the mesh relies on are present
in both configs, and the native and compose files differ only where they must."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from typing import Any

import pytest
import yaml

from mesh_common.http import CALL_DEADLINE
from mesh_gateway.__main__ import DRAIN_SECONDS as GATEWAY_DRAIN_SECONDS
from mesh_gateway.proxy import IDEMPOTENT, MAX_ATTEMPTS
from mesh_gateway.ratelimit import REDIS_TIMEOUT
from mesh_gateway.routes import API

from .conftest import COMPOSE_CONFIG, SAMPLE_VALUES, render_native

# The longest the gateway takes to answer: first its own waits, for the
# token keys (a fetch on an unknown kid) and twice for the rate limiter's
# Redis (a request counted per IP and per user), then every attempt at its
# longest route's deadline. Envoy must outlast it.
BEFORE_PROXYING_S = CALL_DEADLINE + 2 * REDIS_TIMEOUT
GATEWAY_DEADLINE_S = BEFORE_PROXYING_S + MAX_ATTEMPTS * max(route.timeout for route in API.routes)
# aiohttp's keep-alive timeout under web.run_app; Envoy must close idle
# upstream connections before the gateway does.
AIOHTTP_KEEPALIVE_S = 75.0
# Retried only if it never reached a gateway ...
RETRY_ON = "connect-failure,refused-stream,reset-before-request"
# ... or, where repeating it is harmless, also if it did and got no answer.
RETRY_ON_AFTER_A_RESET = "connect-failure,refused-stream,reset"


# --------------------------------------------------------------------------
# helpers


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


def routes(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    (vhost,) = hcm(cfg)["route_config"]["virtual_hosts"]
    return list(vhost["routes"])


def gateway_routes(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The routes to the gateway: all but the first, the probes' 404."""
    probes, *to_gateway = routes(cfg)
    assert "direct_response" in probes
    return to_gateway


def catch_all_route(cfg: dict[str, Any]) -> dict[str, Any]:
    """The last route to the gateway, for every request the others do not match."""
    return gateway_routes(cfg)[-1]


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
    items: Iterable[tuple[object, Any]]
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
    assert manager["preserve_external_request_id"] is False
    assert manager["always_set_request_id_in_response"] is True
    assert manager["use_remote_address"] is True
    assert manager["xff_num_trusted_hops"] == 0
    # Unset, no client is internal; an explicit empty list made every
    # loopback and private-range client internal (see the smoke test).
    assert "internal_address_config" not in manager


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


def test_every_route_to_the_gateway_retries_once_on_another_gateway(cfg: dict[str, Any]) -> None:
    catch_all = catch_all_route(cfg)
    assert catch_all["match"] == {"prefix": "/"}
    for route in gateway_routes(cfg):
        action = route["route"]
        assert action["cluster"] == "gateway"
        # The same waits and the same retry on every route: only the
        # failures that are retried differ.
        assert {k: v for k, v in action.items() if k != "retry_policy"} == {
            k: v for k, v in catch_all["route"].items() if k != "retry_policy"
        }
        retry = dict(action["retry_policy"])
        # Never 5xx/gateway-error: the gateway already retries idempotent calls.
        assert retry.pop("retry_on") in (RETRY_ON, RETRY_ON_AFTER_A_RESET)
        assert retry == {k: v for k, v in catch_all["route"]["retry_policy"].items() if k != "retry_on"}
        assert retry["num_retries"] == 1
        (predicate,) = retry["retry_host_predicate"]
        assert predicate["name"] == "envoy.retry_host_predicates.previous_hosts"
    assert catch_all["route"]["retry_policy"]["retry_on"] == RETRY_ON


def _header(match: dict[str, Any], name: str) -> dict[str, Any]:
    (header,) = [h for h in match.get("headers", []) if h["name"] == name]
    return header


def test_requests_sent_to_a_gateway_are_retried_by_the_gateways_own_rule(cfg: dict[str, Any]) -> None:
    """A reset is retried for exactly the requests the gateway itself would repeat."""
    after_a_reset = [
        route["match"]
        for route in gateway_routes(cfg)
        if route["route"]["retry_policy"]["retry_on"] == RETRY_ON_AFTER_A_RESET
    ]
    methods, posts_with_key = after_a_reset
    assert methods["prefix"] == "/" and len(methods["headers"]) == 1
    # The regex alone, matched as written: no ignore_case, no invert_match.
    method_matcher = _header(methods, ":method")
    assert set(method_matcher) == {"name", "string_match"} and set(method_matcher["string_match"]) == {"safe_regex"}
    pattern = re.compile(method_matcher["string_match"]["safe_regex"]["regex"])
    every_method = {"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "POST", "PATCH", "CONNECT", "TRACE"}
    assert {m for m in every_method if pattern.fullmatch(m)} == IDEMPOTENT
    keyed_paths = set().union(*(route.idempotency_key_paths for route in API.routes))
    assert {posts_with_key["path"]} == keyed_paths
    assert _header(posts_with_key, ":method")["string_match"] == {"exact": "POST"}
    assert _header(posts_with_key, "idempotency-key") == {"name": "idempotency-key", "present_match": True}
    assert len(posts_with_key["headers"]) == 2


def test_the_gateways_probes_are_not_served_to_the_internet(cfg: dict[str, Any]) -> None:
    probes = routes(cfg)[0]
    pattern = re.compile(probes["match"]["safe_regex"]["regex"])
    for path in ("/ready", "/health", "/health/live"):
        assert pattern.fullmatch(path), path
    for path in ("/api/v1/todos", "/readyz", "/healthy", "/api/v1/health", "/.well-known/jwks.json"):
        assert not pattern.fullmatch(path), path
    assert probes["direct_response"] == {"status": 404}  # its body comes from local_reply_config
    assert local_replies(cfg)[404]["code"] == "NOT_FOUND"


def local_replies(cfg: dict[str, Any]) -> dict[int | None, dict[str, Any]]:
    """Envoy's own answers: the problem body of each mapped status, and the default's under None."""
    config = hcm(cfg)["local_reply_config"]
    formats: dict[int | None, dict[str, Any]] = {None: config["body_format"]}
    for mapper in config["mappers"]:
        comparison = mapper["filter"]["status_code_filter"]["comparison"]
        assert comparison["op"] == "EQ"
        formats[comparison["value"]["default_value"]] = mapper["body_format_override"]
    for body_format in formats.values():
        assert body_format["content_type"] == "application/problem+json"
        assert set(body_format["json_format"]) == {"type", "title", "status", "detail", "code"}
        assert body_format["json_format"]["status"] == "%RESPONSE_CODE%"
    return {status: body_format["json_format"] for status, body_format in formats.items()}


def test_envoys_own_answers_are_problems_with_stable_codes(cfg: dict[str, Any]) -> None:
    codes = {status: reply["code"] for status, reply in local_replies(cfg).items()}
    assert codes == {
        404: "NOT_FOUND",
        429: "RATE_LIMITED",
        503: "GATEWAY_UNAVAILABLE",
        504: "GATEWAY_TIMEOUT",
        408: "REQUEST_TIMEOUT",
        400: "MALFORMED_REQUEST",
        None: "EDGE_ERROR",
    }


def test_timeouts_never_beat_the_gateway(cfg: dict[str, Any]) -> None:
    route = catch_all_route(cfg)["route"]
    # No total: it runs to the end of the response, and would cut off a body
    # still streaming. Silence is bounded instead, beyond the gateway's deadlines.
    assert seconds(route["timeout"]) == 0
    assert seconds(route["idle_timeout"]) > GATEWAY_DEADLINE_S
    assert seconds(hcm(cfg)["stream_idle_timeout"]) >= seconds(route["idle_timeout"])
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
    for key in ("interval", "base_ejection_time", "max_ejection_time"):
        assert key in outlier, key
    assert outlier["max_ejection_percent"] == 50
    # A gateway that cannot be reached (refused, reset, timed out) is ejected fast.
    assert outlier["split_external_local_origin_errors"] is True
    assert outlier["enforcing_consecutive_local_origin_failure"] == 100


def test_outlier_detection_does_not_eject_gateways_for_errors_they_all_return(cfg: dict[str, Any]) -> None:
    # A service down behind them makes every gateway answer 503 in a row: ejected
    # for that (Envoy's default enforcement of consecutive_5xx is 100), healthy
    # gateways left the pool, up to half of them, for every route. Only a
    # gateway failing more than the others is an outlier.
    outlier = gateway_cluster(cfg)["outlier_detection"]
    assert outlier["enforcing_consecutive_5xx"] == 0
    assert outlier.get("enforcing_consecutive_gateway_failure", 0) == 0
    assert outlier.get("enforcing_success_rate", 100) == 100
    assert outlier["success_rate_minimum_hosts"] >= 2


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
        # A leaving gateway stays open until Envoy has looked again.
        assert seconds(dns["dns_refresh_rate"]) < GATEWAY_DRAIN_SECONDS
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
