"""Structural checks with PyYAML: the settings the mesh relies on are present
in both configs, and the native and compose files differ only where they must.
The routes to the gateway have their own module, test_envoy_routes.py."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from mesh_gateway.__main__ import DRAIN_SECONDS as GATEWAY_DRAIN_SECONDS
from mesh_gateway.guard import IPV6_CLIENT_PREFIX

from .conftest import SAMPLE_VALUES
from .envoy_config import (
    client_bucket,
    dns_settings,
    gateway_cluster,
    hcm,
    local_rate_limit,
    local_replies,
    seconds,
    upstream_endpoint,
)


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


def test_envoys_own_answers_are_problems_with_stable_codes(cfg: dict[str, Any]) -> None:
    codes = {status: reply["code"] for status, reply in local_replies(cfg).items()}
    assert codes == {
        404: "NOT_FOUND",
        429: "RATE_LIMITED",
        502: "GATEWAY_OUTCOME_UNKNOWN",
        503: "GATEWAY_UNAVAILABLE",
        504: "GATEWAY_TIMEOUT",
        408: "REQUEST_TIMEOUT",
        400: "MALFORMED_REQUEST",
        415: "UNSUPPORTED_MEDIA_TYPE",
        417: "EXPECTATION_FAILED",
        None: "EDGE_ERROR",
    }


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


def _per_second(bucket: dict[str, Any]) -> float:
    return float(bucket["tokens_per_fill"]) / seconds(bucket["fill_interval"])


def test_local_rate_limit_is_a_generous_enforced_shield_for_each_client(cfg: dict[str, Any]) -> None:
    limit = local_rate_limit(cfg)
    assert limit["status"]["code"] == "TooManyRequests"
    # A bucket for each client address, the TCP peer's (the action reads the
    # address Envoy trusts, which use_remote_address and no trusted hops make
    # the peer's), above what a benchmark drives from its one address; an
    # IPv6 client's /64, as the gateway counts it (guard.counted_as).
    masked = {"v4_prefix_mask_len": 32, "v6_prefix_mask_len": IPV6_CLIENT_PREFIX}
    assert limit["rate_limits"] == [{"actions": [{"masked_remote_address": masked}]}]
    per_client = client_bucket(cfg)
    assert per_client["max_tokens"] >= 2000
    assert _per_second(per_client) >= 2000
    # Under a ceiling for all of them, which no client reaches alone: each
    # request a client's bucket lets through takes from it too.
    ceiling = limit["token_bucket"]
    assert limit["always_consume_default_token_bucket"] is True
    assert ceiling["max_tokens"] >= 2 * per_client["max_tokens"]
    assert _per_second(ceiling) >= 2 * _per_second(per_client)
    # Envoy refuses a client's fill interval that is not a multiple of the ceiling's.
    assert seconds(per_client["fill_interval"]) % seconds(ceiling["fill_interval"]) == 0
    # A bucket is kept for every address that can hold a connection at once.
    (connections,) = cfg["overload_manager"]["resource_monitors"]
    assert limit["max_dynamic_descriptors"] >= connections["typed_config"]["max_active_downstream_connections"]
    full = {"numerator": 100, "denominator": "HUNDRED"}
    assert limit["filter_enabled"]["default_value"] == full
    assert limit["filter_enforced"]["default_value"] == full


def test_a_connection_must_start_its_request_as_soon_as_its_headers_must_end(cfg: dict[str, Any]) -> None:
    # request_headers_timeout starts at the first byte: a connection that
    # never sends one is closed by the listener's wait for it, or it held a
    # place under the connection cap for the whole idle timeout.
    (listener,) = cfg["static_resources"]["listeners"]
    (inspector,) = listener["listener_filters"]
    assert inspector["name"] == "envoy.filters.listener.http_inspector"
    assert listener["continue_on_listener_filters_timeout"] is False
    first_byte = seconds(listener["listener_filters_timeout"])
    assert 0 < first_byte <= seconds(hcm(cfg)["request_headers_timeout"])
    assert first_byte < seconds(hcm(cfg)["common_http_protocol_options"]["idle_timeout"])


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
