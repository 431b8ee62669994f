"""What the edge holds each client to, run for real on the rendered native
config: a rate-limit bucket of its own, under a ceiling for all of them, so
that one client past its limit leaves the others theirs; and no place under
the connection cap for a connection that never starts a request."""

from __future__ import annotations

import contextlib
import http.client
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from devstack.config import StackConfig

from .envoy_config import client_bucket, local_rate_limit
from .envoy_run import StandIns, config_for, edited, fetch, running_envoy

# Each client's own loopback address (Linux answers on all of 127/8). The
# gateway's probes are what they ask for: Envoy answers those itself (404),
# so no gateway is needed, and a bucket spent on a 404 is spent all the same.
CLIENT_A, CLIENT_B = "127.0.0.11", "127.0.0.12"
MORE_CLIENTS = [f"127.0.0.{n}" for n in range(13, 40)]
PROBE = "/ready"
# The buckets, N requests a second, become N / SCALE requests an hour: counts
# a test can reach quickly, with no refill while it runs.
SCALE = 1000
# However the buckets come out, no client sends more than this.
MAX_REQUESTS = 100


def _an_hour_of_a_thousandth(cfg: dict[str, Any]) -> None:
    limit = local_rate_limit(cfg)
    for bucket in [limit["token_bucket"], *(d["token_bucket"] for d in limit.get("descriptors", []))]:
        tokens = bucket["max_tokens"] // SCALE
        bucket.update(max_tokens=tokens, tokens_per_fill=tokens, fill_interval="3600s")


def _nobody(infra: StackConfig, tmp_path: Path) -> str:
    """The native config, sending to a gateway nobody registered."""
    nobody = StandIns(f"nobody-{uuid.uuid4().hex[:8]}", 8000)
    return config_for(nobody, infra.ports.consul_dns, tmp_path / "access.log")


def _status(port: int, source: str, headers: dict[str, str] | None = None) -> int:
    """The status Envoy answers a GET of the probes' path with, asked from ``source``."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=(source, 0))
    try:
        connection.request("GET", PROBE, headers=headers or {})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def test_a_client_past_its_limit_leaves_the_other_clients_theirs(infra: StackConfig, tmp_path: Path) -> None:
    rendered = edited(_nobody(infra, tmp_path), _an_hour_of_a_thousandth)
    config = tmp_path / "envoy.yaml"
    config.write_text(rendered)

    with running_envoy(config) as process:
        process.wait_for_hosts(set())
        port = process.public_port
        # A spends its bucket, then is refused; an X-Forwarded-For of its own
        # on each request changes nothing (the peer is the client).
        statuses: list[int] = []
        while len(statuses) < MAX_REQUESTS and 429 not in statuses:
            statuses.append(_status(port, CLIENT_A, {"x-forwarded-for": f"203.0.113.{len(statuses)}"}))
        spent = len(statuses) - 1
        assert statuses == [404] * spent + [429]
        assert [_status(port, CLIENT_A) for _ in range(3)] == [429] * 3
        # B was not part of it. With one bucket for all, B was refused here.
        assert _status(port, CLIENT_B) == 404

        # What A spent is its own bucket's ...
        cfg = yaml.safe_load(rendered)
        assert spent == client_bucket(cfg)["max_tokens"]
        # ... and each request let through took from the ceiling too, those
        # refused did not: once other clients have taken the rest, a client
        # with its own bucket full is refused as well.
        ceiling = local_rate_limit(cfg)["token_bucket"]["max_tokens"]
        assert ceiling > spent
        taken = spent + 1
        clients = iter(MORE_CLIENTS)
        while taken < ceiling:
            share = min(spent, ceiling - taken)
            assert [_status(port, next(clients)) for _ in range(share)] == [404] * share
            taken += share
        assert _status(port, next(clients)) == 429


def test_a_connection_that_never_starts_a_request_is_closed(infra: StackConfig, tmp_path: Path) -> None:
    waited_for = 1.0  # shortened from the listener's 10 s

    def shortened(cfg: dict[str, Any]) -> None:
        (listener,) = cfg["static_resources"]["listeners"]
        listener["listener_filters_timeout"] = f"{waited_for}s"

    config = tmp_path / "envoy.yaml"
    config.write_text(edited(_nobody(infra, tmp_path), shortened))

    with running_envoy(config) as process:
        process.wait_for_hosts(set())
        with socket.create_connection(("127.0.0.1", process.public_port), timeout=5) as silent:
            opened = time.monotonic()
            # Closed by Envoy, not held until its idle timeout (300 s): the
            # read ends (a timeout here, 5 s, fails the test).
            with contextlib.suppress(ConnectionResetError):  # closed all the same
                assert silent.recv(1) == b""
            assert time.monotonic() - opened >= waited_for - 0.1
        # A client that does send is served as before.
        assert fetch(f"{process.public}{PROBE}")[0] == 404
