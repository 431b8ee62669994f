"""The longest the gateway takes to answer, from its own settings: what
Envoy's waits are checked against (test_envoy_routes.py), and what the
retry test's stand-in gateways take (test_envoy_retries.py)."""

from __future__ import annotations

from mesh_common.http import CALL_DEADLINE
from mesh_gateway.proxy import MAX_ATTEMPTS
from mesh_gateway.ratelimit import LONGEST_CHECK
from mesh_gateway.routes import API

# First its own waits, for the token keys (a fetch on an unknown kid) and
# for the rate limiter's Redis, then every attempt at its longest route's
# deadline. The limiter's is one check a request (its IP's and user's
# counters go in one call), and at worst three times Redis's deadline
# (1.5 s): queued behind a call in flight that had to connect first (the
# connect, then the call, each with a deadline of its own), then its own
# draw. A failed call fails what queued behind it, and while Redis is known
# down no check waits.
BEFORE_PROXYING_S = CALL_DEADLINE + LONGEST_CHECK
GATEWAY_DEADLINE_S = BEFORE_PROXYING_S + MAX_ATTEMPTS * max(route.timeout for route in API.routes)
