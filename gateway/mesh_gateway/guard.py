"""The gateway's front door: who is calling, and are they within their limits.

Public routes (``API.public`` in routes.py) pass without a token; every other proxied
route needs a valid access token of a user, verified locally from the JWKS.
Then the rate limiter counts the request against its client IP and its user.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import NoReturn

import structlog
from aiohttp import web

from mesh_common.auth import authenticate
from mesh_common.problems import Forbidden, Handler, TooManyRequests, Unauthorized, problem

from .keys import RATE_LIMITER, ROUTE_TABLE, SETTINGS
from .outage import RateLimiterUnavailable
from .ratelimit import READS, Decision
from .settings import Network

log = structlog.get_logger()
RateLimiterDown = problem(503, "RATE_LIMITER_UNAVAILABLE", "Rate limiting is unavailable; writes are paused")
# The request's standing against its limits, for the headers of its response.
RATE_DECISION = web.RequestKey("gateway.rate_decision", Decision)
# The gateway's own endpoints, by route name: probes must never be limited or
# authenticated. By the route the router matched, not by the decoded path:
# "/health%2Flive" decodes to "/health/live" but is routed to the proxy.
OWN_ROUTES = frozenset({"health", "health.live", "ready"})
# The prefix an IPv6 client is counted by (``counted_as``): a host's own network.
IPV6_CLIENT_PREFIX = 64


def client_ip(request: web.Request) -> str:
    """The caller's address as the edge saw it.

    Envoy (the one trusted hop) appends the peer it saw to X-Forwarded-For, so
    its last entry is the one a client cannot forge; but only when the request
    comes from Envoy. From any other peer the header is the client's own say,
    and the peer is the client.
    """
    peer = request.remote or "unknown"
    forwarded = request.headers.getall("X-Forwarded-For", ())
    if forwarded and _is_trusted(peer, request.app[SETTINGS].trusted_proxies):
        # The proxy's own entry is the very last, whatever the client sent before it.
        return forwarded[-1].rsplit(",", 1)[-1].strip() or peer
    return peer


@functools.lru_cache(maxsize=4096)
def counted_as(ip: str) -> str:
    """What the per-IP limits count ``ip`` as: an IPv4 address itself, an IPv6 address its /64.

    A host on IPv6 is handed a whole /64 (SLAAC, privacy addresses): counted
    by its full address, one client could take a fresh address, and a fresh
    allowance, for every request, and the tight limit on logins would hold
    no one. Envoy's buckets group addresses the same way (envoy/).
    """
    address = _address(ip)
    if address is None:  # "unknown", or whatever a trusted proxy wrote
        return ip
    if isinstance(address, ipaddress.IPv4Address):
        return str(address)  # one client, whichever socket saw it
    return str(ipaddress.IPv6Network((address, IPV6_CLIENT_PREFIX), strict=False))


@functools.lru_cache(maxsize=1024)
def _is_trusted(peer: str, proxies: tuple[Network, ...]) -> bool:
    # Cached: the gateway sees a handful of peers (the Envoys), and parsing an
    # address on every request is measurable at its rates.
    address = _address(peer)  # None: "unknown", or a unix socket
    return address is not None and any(address in network for network in proxies)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``text`` as an address, an IPv4 one seen through a dual-stack socket (``::ffff:a.b.c.d``) as itself."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


async def enforce_limits(request: web.Request, *, ip: str, user: str | None, token_refused: bool = False) -> None:
    """Count the request from ``ip`` (``counted_as(client_ip(...))``); refuse it (429) when over a limit.

    The decision is kept on the request, for the ``RateLimit-*`` headers of
    whatever answers it; there is none when Redis is away and a read passes
    anyway: what this gateway alone let through is no count of the limit's.
    A request whose token was refused (``token_refused``) is refused anyway:
    it is only counted.
    """
    table, limiter = request.app[ROUTE_TABLE], request.app[RATE_LIMITER]
    try:
        decision = await limiter.check(ip=ip, user=user, auth_route=(request.method, request.path) in table.auth)
    except RateLimiterUnavailable as exc:
        session = (request.method, request.path) in table.session
        if request.method in READS or session or token_refused:
            # Open, but not to a flood: the session writes are proven by a
            # token only the service can check, so each junk one would take
            # a transaction there, unbounded, from the users it is open for.
            # And a refused token, whatever it asked for, cost a signature
            # check: uncounted, writes with junk tokens were unbounded.
            refused = limiter.unchecked_refusal(ip=ip, session=session)
            if refused is not None:
                limiter.outage.refused_unchecked(ip)
                _refuse(refused)
            if token_refused:
                return None
            # Once an outage, not per request: thousands a second otherwise.
            # The limiter logs when it ends, with how many passed.
            if limiter.outage.passed_unchecked():
                log.warning("rate_limiter_unavailable_failing_open", error=str(exc))
            return None
        raise RateLimiterDown(headers={"Retry-After": "1"}) from None
    if not decision.allowed:
        _refuse(decision)
    request[RATE_DECISION] = decision


def _refuse(decision: Decision) -> NoReturn:
    raise TooManyRequests("Slow down", headers={**decision.headers(), "Retry-After": str(decision.reset_seconds)})


async def _count_refused(request: web.Request, ip: str) -> None:
    """Count a request refused for its token against the caller's IP: a 429 instead if that is over its limit.

    So that guessing tokens is limited like everything else (and the
    refusal carries the RateLimit-* headers too). While Redis is away it
    takes from the IP's unchecked allowance, whatever its method, and is
    never a 503: that would have the client retry a token that will never
    pass instead of signing in again.
    """
    await enforce_limits(request, ip=ip, user=None, token_refused=True)


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.match_info.route.name in OWN_ROUTES:
        return await handler(request)
    user: str | None = None
    ip = counted_as(client_ip(request))
    table = request.app[ROUTE_TABLE]
    # Any method of a public path passes untokened: the service behind it
    # answers one it does not take with a 405 and its Allow (a HEAD as its
    # GET), and one it takes only with a token with its own 401. Refused
    # here, a client that used the wrong method was told to sign in.
    if request.path not in table.public_paths:
        # Refused anyway, a client past its per-IP limit (or, while Redis is
        # down, its allowance) must not cost a signature check per request
        # (failed tokens are not remembered).
        # Only what this gateway already knows, from its leases: asking
        # Redis here would cost a second round trip for every request whose
        # IP and user counters both need a draw.
        refused = request.app[RATE_LIMITER].refused_in_hand(
            ip=ip, auth_route=(request.method, request.path) in table.auth
        )
        if refused is not None:
            _refuse(refused)
        try:
            principal = await authenticate(request)
        except Unauthorized:
            await _count_refused(request, ip)
            raise
        if principal.is_service:
            # Service tokens are for calls between services, which go to
            # each other through Consul, never through the edge: one here
            # has leaked, and would read any user's profile (RFC 8725 3.12).
            await _count_refused(request, ip)
            log.warning("service_token_at_edge")
            raise Forbidden("Service tokens are not accepted here; the public API is for users")
        user = principal.subject
    await enforce_limits(request, ip=ip, user=user)
    return await handler(request)


async def add_rate_limit_headers(request: web.Request, response: web.StreamResponse) -> None:
    """RateLimit-* on every response to a counted request: streamed ones and the gateway's own errors too.

    An ``on_response_prepare`` hook, because a streamed response is sent
    from inside the handler, and an error's response is made outside the
    guard, where the guard could not add them.
    """
    decision = request.get(RATE_DECISION)
    if decision is not None:
        response.headers.update(decision.headers())
