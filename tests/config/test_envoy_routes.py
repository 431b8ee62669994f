"""The routes to the gateway, in both configs: what Envoy retries (by the
gateway's own rule), how long it waits (never less than the gateway), and the
gateway's probes, hidden from the internet."""

from __future__ import annotations

import re
from typing import Any

from mesh_common.http import CALL_DEADLINE
from mesh_gateway.proxy import IDEMPOTENT, MAX_ATTEMPTS
from mesh_gateway.ratelimit import LONGEST_CHECK
from mesh_gateway.routes import API

from .envoy_config import catch_all_route, gateway_cluster, gateway_routes, hcm, local_replies, routes, seconds

# The longest the gateway takes to answer: first its own waits, for the
# token keys (a fetch on an unknown kid) and for the rate limiter's Redis,
# then every attempt at its longest route's deadline. Envoy must outlast it.
# The limiter's is one check a request (its IP's and user's counters go in
# one call), and at worst three times Redis's deadline (1.5 s): queued
# behind a call in flight that had to connect first (the connect, then the
# call, each with a deadline of its own), then its own draw. A failed call
# fails what queued behind it, and while Redis is known down no check waits.
BEFORE_PROXYING_S = CALL_DEADLINE + LONGEST_CHECK
GATEWAY_DEADLINE_S = BEFORE_PROXYING_S + MAX_ATTEMPTS * max(route.timeout for route in API.routes)
# aiohttp's keep-alive timeout under web.run_app; Envoy must close idle
# upstream connections before the gateway does.
AIOHTTP_KEEPALIVE_S = 75.0
# Retried only if it never reached a gateway ...
RETRY_ON = "connect-failure,refused-stream,reset-before-request"
# ... or, where repeating it is harmless, also if it did and got no answer.
RETRY_ON_AFTER_A_RESET = "connect-failure,refused-stream,reset"


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
