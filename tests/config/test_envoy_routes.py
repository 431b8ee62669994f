"""The routes to the gateway, in both configs: what Envoy retries (by the
gateway's own rule), how long it waits (never less than every gateway it
tries), and the gateway's probes, hidden from the internet."""

from __future__ import annotations

import re
from typing import Any

from mesh_gateway.__main__ import DRAIN_SECONDS as GATEWAY_DRAIN_SECONDS
from mesh_gateway.proxy import IDEMPOTENT
from mesh_gateway.routes import API

from .envoy_config import catch_all_route, gateway_cluster, gateway_routes, hcm, local_replies, routes, seconds
from .gateway_deadline import GATEWAY_DEADLINE_S

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


def longest_silence(route: dict[str, Any], connect_timeout: float) -> float:
    """The longest a client may hear nothing from Envoy on ``route`` while its gateways are within their deadlines.

    A gateway may hold a request for its whole deadline and then close (a
    crash, or its shutdown cutting requests off), where the route retries a
    reset; Envoy then gives the request to another gateway, after its
    back-off. Each attempt may first take the connect timeout. Nothing of
    this restarts Envoy's idle timer, which counts from the client's last byte.
    """
    action = route["route"]
    retry = action["retry_policy"]
    # An attempt cut short by Envoy itself would be retried while the gateway
    # may still act on it (a PUT run twice), and would change the sum.
    assert not {"per_try_timeout", "per_try_idle_timeout"} & retry.keys()
    retries = retry["num_retries"]
    retried_after_an_answer_was_awaited = "reset" in retry["retry_on"].split(",")
    held_before_a_retry = GATEWAY_DEADLINE_S if retried_after_an_answer_was_awaited else 0.0
    back_off = seconds(retry["retry_back_off"]["max_interval"])
    return connect_timeout + retries * (held_before_a_retry + back_off + connect_timeout) + GATEWAY_DEADLINE_S


def test_timeouts_never_beat_the_gateway(cfg: dict[str, Any]) -> None:
    cluster = gateway_cluster(cfg)
    assert seconds(cluster["connect_timeout"]) == 1.0
    for route in gateway_routes(cfg):
        action = route["route"]
        # No total: it runs to the end of the response, and would cut off a
        # body still streaming. Silence is bounded instead, beyond the longest
        # the gateways Envoy tries may take between them: 15 s, one gateway's,
        # gave the client Envoy's 504 while a retry's gateway was still in time.
        assert seconds(action["timeout"]) == 0
        assert seconds(action["idle_timeout"]) > longest_silence(route, seconds(cluster["connect_timeout"]))
        assert seconds(hcm(cfg)["stream_idle_timeout"]) >= seconds(action["idle_timeout"])
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    upstream_idle = seconds(options["common_http_protocol_options"]["idle_timeout"])
    assert 0 < upstream_idle < AIOHTTP_KEEPALIVE_S
    # Closed by Envoy within a leaving gateway's drain, not by the gateway after it.
    assert upstream_idle < GATEWAY_DRAIN_SECONDS
