"""What a gateway lets through unchecked while Redis is away: open to users, never to one client's flood."""

from __future__ import annotations

import asyncio
import math

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs

from mesh_common.jwks import JwksVerifier, Principal
from mesh_gateway.outage import SESSION_SHARE, Allowance, Buckets, session_allowance

# Nothing listens there: Redis is away from the first request on.
REDIS_AWAY = "redis://127.0.0.1:1/0"
AUTH_LIMIT = 30  # the session writes' allowance, per window (60 s): a tenth of the IP's limit
IP_LIMIT = SESSION_SHARE * AUTH_LIMIT
JUNK = 500


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def flood(
    client: TestClient[web.Request, web.Application],
    method: str,
    path: str,
    ip: str,
    count: int,
    *,
    limit: int,
    headers: dict[str, str] | None = None,
    json: object = None,
) -> list[int]:
    """``count`` requests from ``ip``, one after another (so each is counted before the next), within 60 s.

    Each refused as the limiter refuses: a problem, and when to come back,
    which is when the bucket of ``limit`` a minute has refilled one.
    """
    headers = {**(headers or {}), "X-Forwarded-For": ip}  # Envoy's entry, from loopback: a trusted proxy
    statuses = []
    async with asyncio.timeout(60):
        for _ in range(count):
            async with client.request(method, path, headers=headers, json=json) as r:
                statuses.append(r.status)
                if r.status == 429:
                    assert r.content_type == "application/problem+json"
                    assert (await r.json())["code"] == "RATE_LIMITED"
                    assert 1 <= int(r.headers["Retry-After"]) <= math.ceil(60 / limit)
                    assert r.headers["RateLimit-Limit"] == str(limit)
                    assert r.headers["RateLimit-Remaining"] == "0"
    return statuses


async def test_junk_refreshes_from_one_ip_reach_the_service_only_within_an_allowance(fake_service, gateway):
    # The refreshes used to pass uncounted, all of them: each a transaction
    # on the user-service, queueing every real user's refresh behind it.
    service = await fake_service(1)
    client = await gateway(service, redis_url=REDIS_AWAY, rate_limit_ip=IP_LIMIT)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with capture_logs() as logs:
        statuses = await flood(
            client,
            "POST",
            "/api/v1/things/refresh",
            "203.0.113.66",
            JUNK,
            limit=AUTH_LIMIT,
            json={"refresh_token": "x"},
        )
    took = loop.time() - started
    # The burst at once, then one every 2 s while the flood lasts.
    allowance = AUTH_LIMIT + math.ceil(took * AUTH_LIMIT / 60)
    print(f"\n{service.hits} of {JUNK} junk refreshes reached the service in {took:.1f} s")
    assert statuses[:AUTH_LIMIT] == [200] * AUTH_LIMIT
    assert AUTH_LIMIT <= service.hits <= allowance
    assert statuses.count(429) == JUNK - service.hits
    # Logged once, not per refusal.
    assert [e["event"] for e in logs].count("rate_limiter_unavailable_refusing") == 1
    # Another client's refresh is no business of the flood's.
    hits = service.hits
    async with client.post(
        "/api/v1/things/refresh", json={"refresh_token": "real"}, headers={"X-Forwarded-For": "198.51.100.20"}
    ) as r:
        assert r.status == 200
    assert service.hits == hits + 1


async def test_reads_while_redis_is_away_are_bounded_per_ip_by_the_ip_limit(fake_service, gateway, tokens):
    service = await fake_service(1)
    limit = 20
    client = await gateway(service, redis_url=REDIS_AWAY, rate_limit_ip=limit)
    loop = asyncio.get_running_loop()
    started = loop.time()
    statuses = await flood(
        client, "GET", "/api/v1/things", "203.0.113.67", 3 * limit, limit=limit, headers=tokens.headers()
    )
    took = loop.time() - started
    assert statuses[:limit] == [200] * limit
    assert limit <= service.hits <= limit + math.ceil(took * limit / 60)
    async with client.get("/api/v1/things", headers={**tokens.headers(), "X-Forwarded-For": "198.51.100.21"}) as r:
        assert r.status == 200


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_refused_tokens_while_redis_is_away_cost_a_check_only_within_the_ip_allowance(
    method: str, fake_service, gateway, tokens, monkeypatch
):
    # Before, a refused token was never turned away before its signature was
    # checked, and a write's was not even counted: a flood of them cost a
    # signature check each (some 90 us of the loop), unbounded.
    checked = 0
    verify = JwksVerifier._verify

    async def counted(self: JwksVerifier, token: str) -> Principal:
        nonlocal checked
        checked += 1
        return await verify(self, token)

    monkeypatch.setattr(JwksVerifier, "_verify", counted)
    service = await fake_service(1)
    limit = 20
    client = await gateway(service, redis_url=REDIS_AWAY, rate_limit_ip=limit)
    expired = {"Authorization": f"Bearer {tokens.token(ttl=-60)}"}  # signed by a known key: the signature is checked
    loop = asyncio.get_running_loop()
    started = loop.time()
    with capture_logs() as logs:
        statuses = await flood(
            client, method, "/api/v1/things", "203.0.113.68", 5 * limit, limit=limit, headers=expired
        )
    took = loop.time() - started
    allowance = limit + math.ceil(took * limit / 60)
    assert statuses[:limit] == [401] * limit
    assert limit <= statuses.count(401) == checked <= allowance
    assert statuses.count(429) == 5 * limit - checked
    assert service.hits == 0
    assert [e["event"] for e in logs].count("rate_limiter_unavailable_refusing") == 1
    # The flood's allowance is its own: another client's read goes on.
    async with client.get("/api/v1/things", headers={**tokens.headers(), "X-Forwarded-For": "198.51.100.22"}) as r:
        assert r.status == 200


def test_thousands_of_users_behind_one_address_keep_refreshing_by_default():
    # The auth routes' 30 a minute, which the allowance first was, refused
    # all but a few dozen of a thousand users behind one NAT: signed out, the
    # outcome the session writes' fail-open is there to prevent.
    clock = Clock()
    buckets = Buckets(session_allowance(6000, 60), clock=clock)
    per_second = 5000 / 600  # 5,000 users, each refreshing once an access token (10 minutes)
    for second in range(3600):  # an hour of them, spread evenly over each second
        due = math.floor((second + 1) * per_second) - math.floor(second * per_second)
        for _ in range(due):
            assert buckets.take("203.0.113.80") == 0, f"refused at {second} s"
            clock.now += 1 / due
    # A flood from one address still gets no more than the allowance.
    assert sum(buckets.take("203.0.113.81") == 0 for _ in range(10_000)) == 6000 // SESSION_SHARE


def test_a_user_refreshing_every_few_minutes_is_never_refused_whatever_floods_beside():
    clock = Clock()
    buckets = Buckets(Allowance(AUTH_LIMIT, AUTH_LIMIT / 60), clock=clock)
    minutes, flooded = 24 * 60, 0
    for minute in range(minutes):  # a day
        # A flood beside the user, on the same gateway: a thousand a minute
        # from one client, of which only the burst, then the refill, pass.
        flooded += sum(buckets.take("203.0.113.66") == 0 for _ in range(1000))
        if minute % 3 == 0:
            assert buckets.take("198.51.100.20") == 0
        clock.now += 60
    assert flooded == AUTH_LIMIT * minutes


def test_the_table_keeps_at_most_its_size_and_forgets_the_client_seen_longest_ago():
    clock = Clock()
    buckets = Buckets(Allowance(2, 0.001), kept=100, clock=clock)
    assert buckets.take("flood") == 0 and buckets.take("flood") == 0
    assert buckets.take("flood") > 0
    for n in range(99):
        buckets.take(f"192.0.2.{n}")
    assert buckets.take("flood") > 0  # still kept: the other 99 and it fill the table
    for n in range(10_000):
        buckets.take(f"2001:db8::{n:x}")
        assert len(buckets) <= 100
    # Forgotten, so it starts again from a full bucket: what those 10,000
    # addresses got through anyway, each of them.
    assert buckets.take("flood") == 0
