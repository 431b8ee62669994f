"""Reading the parts of a parsed Envoy config that the structure checks look at."""

from __future__ import annotations

import itertools
import re
from typing import Any


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
    """The routes to the gateway: all but Envoy's own answers, which come first.

    Those are the probes' 404 and the refusals of what the gateway's HTTP
    parser would answer with bare text.
    """
    every = routes(cfg)
    answered = sum(1 for _ in itertools.takewhile(lambda route: "direct_response" in route, every))
    to_gateway = every[answered:]
    assert answered and all("route" in route for route in to_gateway)
    return to_gateway


def catch_all_route(cfg: dict[str, Any]) -> dict[str, Any]:
    """The last route to the gateway, for every request the others do not match."""
    return gateway_routes(cfg)[-1]


def http_filter(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    matches = [f for f in hcm(cfg)["http_filters"] if f["name"] == name]
    assert len(matches) == 1, f"expected exactly one {name}"
    return matches[0]["typed_config"]


def local_rate_limit(cfg: dict[str, Any]) -> dict[str, Any]:
    return http_filter(cfg, "envoy.filters.http.local_ratelimit")


def client_bucket(cfg: dict[str, Any]) -> dict[str, Any]:
    """The local rate limit's bucket for each client address: a descriptor with no value, a wildcard."""
    (descriptor,) = local_rate_limit(cfg)["descriptors"]
    assert descriptor["entries"] == [{"key": "masked_remote_address"}]
    bucket: dict[str, Any] = descriptor["token_bucket"]
    return bucket


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


def local_replies(cfg: dict[str, Any]) -> dict[int | None, dict[str, Any]]:
    """Envoy's own answers: the problem body of each mapped status, and the default's under None."""
    config = hcm(cfg)["local_reply_config"]
    formats: dict[int | None, dict[str, Any]] = {None: config["body_format"]}
    for mapper in config["mappers"]:
        # A status alone, or with response flags (and_filter): keyed by the status answered.
        filters = mapper["filter"].get("and_filter", {"filters": [mapper["filter"]]})["filters"]
        (comparison,) = [f["status_code_filter"]["comparison"] for f in filters if "status_code_filter" in f]
        assert comparison["op"] == "EQ"
        status = mapper.get("status_code", comparison["value"]["default_value"])
        assert status not in formats, f"two mappers answer {status}"
        formats[status] = mapper["body_format_override"]
    for body_format in formats.values():
        assert body_format["content_type"] == "application/problem+json"
        assert set(body_format["json_format"]) == {"type", "title", "status", "detail", "code"}
        assert body_format["json_format"]["status"] == "%RESPONSE_CODE%"
    return {status: body_format["json_format"] for status, body_format in formats.items()}
