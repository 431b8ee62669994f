"""Authentication, rate limits and body limits at the gateway."""

from __future__ import annotations

import asyncio
import time
import uuid

from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient

from mesh_common.auth import VERIFIER
from mesh_common.jwks import Principal
from mesh_common.testing import TokenFactory


async def test_routes_need_a_token_unless_listed_public(fake_service, gateway, tokens: TokenFactory):
    service = await fake_service(1)
    client = await gateway(service)
    async with client.get("/api/v1/things") as r:
        assert r.status == 401
        assert (await r.json())["code"] == "UNAUTHORIZED"
    async with client.get("/api/v1/things", headers={"Authorization": "Bearer not.a.token"}) as r:
        assert r.status == 401
        assert (await r.json())["code"] == "INVALID_TOKEN"
    other_issuer = TokenFactory()  # a key the gateway has never seen
    async with client.get("/api/v1/things", headers=other_issuer.headers()) as r:
        assert r.status == 401
    async with client.get("/api/v1/things/public") as r:
        assert r.status == 200
    async with client.head("/api/v1/things/public") as r:
        assert r.status == 200  # as its GET: a monitor checking the JWKS with HEAD was told to sign in
    async with client.head("/api/v1/things") as r:
        assert r.status == 401
    # Another method of a public path is the service's to answer (its 405
    # and Allow), not a call to sign in; the fake service answers anything.
    hits = service.hits
    async with client.delete("/api/v1/things/public") as r:
        assert r.status == 200
    assert service.hits == hits + 1
    async with client.get("/api/v1/things", headers=tokens.headers()) as r:
        assert r.status == 200


async def test_rate_limit_holds_across_two_gateway_instances(fake_service, gateway, tokens):
    service = await fake_service(1)
    limit = 20
    first = await gateway(service, rate_limit_ip=limit)
    second = await gateway(service, rate_limit_ip=limit)
    headers = {**tokens.headers(), "X-Forwarded-For": "198.51.100.7"}

    async def get(client: TestClient[web.Request, web.Application]) -> ClientResponse:
        async with client.get("/api/v1/things", headers=headers) as response:
            await response.read()  # and released: its status and headers stay readable
            return response

    started = int(time.time())
    statuses = await asyncio.gather(*(get(c) for _ in range(30) for c in (first, second)))
    accepted = sum(r.status == 200 for r in statuses)
    refused = [r for r in statuses if r.status == 429]
    print(f"\naccepted {accepted} of {len(statuses)} with a limit of {limit} across 2 gateways")
    # Exactly the limit: never more across two gateways, and none lost or counted twice.
    assert accepted == limit
    assert accepted + len(refused) == len(statuses)
    assert int(refused[0].headers["Retry-After"]) >= 1
    assert refused[0].headers["RateLimit-Limit"] == str(limit)
    assert refused[0].headers["RateLimit-Remaining"] == "0"
    # The reset is when this fixed window ends, not a full window after the first hit.
    assert int(refused[0].headers["RateLimit-Reset"]) <= 60 - started % 60 + 1


async def test_login_has_a_tighter_limit(fake_service, gateway):
    service = await fake_service(1)
    client = await gateway(service, rate_limit_auth=3)
    statuses = []
    for _ in range(5):
        async with client.post("/api/v1/things/login", json={}) as r:
            statuses.append(r.status)
    assert statuses == [200, 200, 200, 429, 429]


async def test_an_ipv6_client_is_counted_by_its_64_not_by_each_address(fake_service, gateway):
    # A host holds a whole /64: a fresh address for each login must not
    # bring a fresh allowance. Another /64 is another client.
    service = await fake_service(1)
    client = await gateway(service, rate_limit_auth=3)

    async def login(address: str) -> int:
        async with client.post("/api/v1/things/login", json={}, headers={"X-Forwarded-For": address}) as r:
            return r.status

    one_host = [f"2001:db8:1:2::{n:x}" for n in range(1, 5)] + ["2001:db8:1:2:ffff:ffff:ffff:ffff"]
    assert [await login(address) for address in one_host] == [200, 200, 200, 429, 429]
    assert await login("2001:db8:1:3::1") == 200
    # An IPv4 client seen through a dual-stack socket is the same client.
    assert [await login(a) for a in ("192.0.2.9", "192.0.2.9", "::ffff:192.0.2.9", "192.0.2.9")] == [200, 200, 200, 429]


async def test_every_counted_response_says_where_its_caller_stands(fake_service, gateway, tokens):
    service = await fake_service(1)
    (instance,) = service.instances
    client = await gateway(service, rate_limit_user=50)

    async def limit_headers() -> dict[str, str]:
        async with client.get("/api/v1/things", headers=tokens.headers()) as r:
            await r.read()
            return {k: v for k, v in r.headers.items() if k.startswith("RateLimit-")}

    assert (await limit_headers())["RateLimit-Limit"]  # buffered
    instance.mode = "large"
    assert (await limit_headers())["RateLimit-Limit"]  # streamed: sent from inside the proxy
    instance.mode = "fail"
    assert (await limit_headers())["RateLimit-Limit"]  # the upstream's 5xx, passed through
    await instance.server.close()
    assert (await limit_headers())["RateLimit-Limit"]  # the gateway's own error

    # A failed authentication is counted against the IP: its 401 says so too.
    ip_limited = await gateway(service, rate_limit_ip=40)
    async with ip_limited.get("/api/v1/things", headers={"Authorization": "Bearer not.a.token"}) as r:
        assert r.status == 401
        assert r.headers["RateLimit-Limit"] == "40"
        assert int(r.headers["RateLimit-Remaining"]) < 40


async def test_redis_down_fails_open_for_reads_and_closed_for_writes(fake_service, gateway, tokens, infra):
    service = await fake_service(1)
    client = await gateway(service, redis_url="redis://127.0.0.1:1/0")  # nothing listens there
    async with client.get("/api/v1/things", headers=tokens.headers()) as r:
        assert r.status == 200
    async with client.post("/api/v1/things", json={}, headers=tokens.headers()) as r:
        assert r.status == 503
        assert (await r.json())["code"] == "RATE_LIMITER_UNAVAILABLE"
    async with client.post("/api/v1/things/login", json={}) as r:
        assert r.status == 503
    # Keeping a session is not the abuse the limits are for: refused, every
    # user would be signed out once their access token ran out.
    async with client.post("/api/v1/things/refresh", json={}) as r:
        assert r.status == 200
    assert service.hits == 2
    # A token that will never pass is told so, not to come back in a second.
    async with client.post("/api/v1/things", json={}, headers={"Authorization": "Bearer not.a.token"}) as r:
        assert r.status == 401


async def test_oversized_body_is_413(fake_service, gateway, tokens):
    service = await fake_service(1)
    client = await gateway(service, max_body=1024)
    async with client.post("/api/v1/things", data=b"x" * 4096, headers=tokens.headers()) as r:
        assert r.status == 413
        assert (await r.json())["code"] == "PAYLOAD_TOO_LARGE"
    assert service.hits == 0


async def test_failed_authentication_counts_against_the_callers_ip(fake_service, gateway):
    service = await fake_service(1)
    client = await gateway(service, rate_limit_ip=5)
    statuses = []
    for _ in range(8):
        async with client.get("/api/v1/things", headers={"Authorization": "Bearer forged"}) as r:
            statuses.append(r.status)
    assert statuses == [401] * 5 + [429] * 3


async def test_dot_segments_and_encoded_slashes_never_reach_other_paths(fake_service, gateway, tokens):
    service = await fake_service(1)
    client = await gateway(service)
    async with client.get("/api/v1/things/%2E%2E/secret", headers=tokens.headers()) as r:
        assert r.status == 404
    async with client.get("/api/v1/things/a%2Fb%3Fx=1", headers=tokens.headers()) as r:
        assert r.status == 200
        body = await r.json()
    # The upstream sees one path segment "a/b?x=1" (its own decoding), never a query.
    assert body["path"] == "/things/a/b?x=1"
    assert service.hits == 1


async def test_only_the_gateways_own_probes_skip_the_token_and_the_limits(fake_service, gateway):
    # The guard let a path through when it decoded to a probe's: "/health%2Flive"
    # passed unauthenticated and uncounted, though the router sent it to the proxy.
    client = await gateway(await fake_service(1))
    for probe in ("/health", "/health/live"):
        async with client.get(probe) as r:
            assert r.status == 200, probe
    for spelling in ("/health%2Flive", "/health%2flive"):
        async with client.get(spelling) as r:
            assert r.status == 401, spelling
            assert (await r.json())["code"] == "UNAUTHORIZED"


async def test_a_client_past_its_ip_limit_costs_no_signature_check(fake_service, gateway, tokens, monkeypatch):
    # A token with a known kid and a forged signature: a PyJWT parse and an
    # Ed25519 check each time (a token that failed is not remembered), which
    # a client refused anyway must not be able to make the gateway do.
    client = await gateway(await fake_service(1), rate_limit_ip=1)
    verifier = client.app[VERIFIER]
    checked = 0
    verify = verifier._verify

    async def counting(token: str) -> Principal:
        nonlocal checked
        checked += 1
        return await verify(token)

    monkeypatch.setattr(verifier, "_verify", counting)
    signed, _, signature = tokens.token().rpartition(".")
    forged = f"{signed}.{signature[:20]}{'B' if signature[20] == 'A' else 'A'}{signature[21:]}"
    statuses = []
    for _ in range(3):
        async with client.get("/api/v1/things", headers={"Authorization": f"Bearer {forged}"}) as r:
            statuses.append(r.status)
            assert r.headers["RateLimit-Limit"] == "1"
    assert statuses == [401, 429, 429]  # as before: a failed token counts, and past the limit is refused
    assert checked == 1


async def test_a_service_token_is_refused_at_the_edge(fake_service, gateway, tokens):
    # Services call each other through Consul, never through the gateway: a
    # service token at the edge has leaked, and its users:read would read
    # any user's profile.
    service = await fake_service(1)
    client = await gateway(service, rate_limit_ip=40)
    profile = f"/api/v1/things/{uuid.uuid4()}"
    async with client.get(profile, headers=tokens.headers("service:notification-service", scope="users:read")) as r:
        assert r.status == 403
        assert r.content_type == "application/problem+json"
        assert (await r.json())["code"] == "FORBIDDEN"
        assert r.headers["RateLimit-Limit"] == "40"  # counted against the caller's IP, like a failed token
    assert service.hits == 0
    async with client.get(profile, headers=tokens.headers(scope="users:read")) as r:
        assert r.status == 200  # a user's token, as ever
