"""Retries on another instance: when a request may be sent twice, and how many a retry budget allows."""

from __future__ import annotations

from mesh_common.testing import TokenFactory


async def test_idempotent_request_is_retried_once_on_a_different_instance(fake_service, gateway, tokens):
    service = await fake_service(2)
    broken, healthy = service.instances
    broken.mode = "fail"
    client = await gateway(service)
    # The retry budget always allows 3 retries per window: stay within them.
    for _ in range(50):
        before = broken.hits
        async with client.get("/api/v1/things", headers=tokens.headers()) as r:
            assert r.status == 200
            assert r.headers["X-Upstream-Instance"] == healthy.service_id
        assert broken.hits - before <= 1  # tried at most once, never twice on the same instance
        if broken.hits == 3:
            break
    assert broken.hits == 3


async def test_post_without_idempotency_key_is_not_retried(fake_service, gateway, tokens):
    service = await fake_service(2)
    for instance in service.instances:
        instance.mode = "fail"
    client = await gateway(service)
    async with client.post("/api/v1/things", json={"a": 1}, headers=tokens.headers()) as r:
        assert r.status == 500  # the upstream's own problem body, passed through
        assert (await r.json())["code"] == "BOOM"
    assert service.hits == 1


async def test_post_with_idempotency_key_is_retried(fake_service, gateway, tokens):
    service = await fake_service(2)
    service.instances[0].mode = "fail"
    client = await gateway(service)
    for _ in range(50):
        headers = {**tokens.headers(), "Idempotency-Key": "k-1"}
        async with client.post("/api/v1/things", json={"a": 1}, headers=headers) as r:
            assert r.status == 200
        if service.instances[0].hits == 3:  # the budget's floor: 3 retries per window
            break
    assert service.instances[0].hits == 3


async def test_an_idempotency_key_makes_a_post_retryable_only_where_honoured(fake_service, gateway, tokens):
    service = await fake_service(2)
    for instance in service.instances:
        instance.mode = "fail"
    client = await gateway(service)
    headers = {**tokens.headers(), "Idempotency-Key": "k-2"}
    async with client.post("/api/v1/things/1/complete", json={}, headers=headers) as r:
        assert r.status == 500
    assert service.hits == 1  # the service would not recognise the key: a retry could act twice


async def test_connection_refused_is_retried_even_for_post(fake_service, gateway, tokens):
    service = await fake_service(2)
    dead, alive = service.instances
    await dead.server.close()  # Consul still lists it: only the breaker can learn
    client = await gateway(service)
    for _ in range(20):  # more refusals than the retry budget's floor: they cost no budget
        async with client.post("/api/v1/things", json={}, headers=tokens.headers()) as r:
            assert r.status == 200
            assert r.headers["X-Upstream-Instance"] == alive.service_id


async def test_a_read_a_busy_instance_declines_is_retried_on_another(fake_service, gateway, tokens):
    service = await fake_service(2)
    busy, free = service.instances
    busy.mode = "busy"
    client = await gateway(service)
    for _ in range(50):
        async with client.get("/api/v1/things", headers=tokens.headers()) as r:
            assert r.status == 200
            assert r.headers["X-Upstream-Instance"] == free.service_id
        if busy.hits == 3:  # the retry budget's floor: 3 retries per window
            break
    assert busy.hits == 3


async def test_retry_budget_holds_when_every_instance_fails(fake_service, gateway, tokens: TokenFactory):
    service = await fake_service(3)
    for instance in service.instances:
        instance.mode = "fail"
    # A high breaker threshold keeps every attempt reaching an upstream.
    client = await gateway(service, breaker_failures=10_000)
    requests = 200
    for _ in range(requests):
        async with client.get("/api/v1/things", headers=tokens.headers()) as r:
            assert r.status == 500
    ratio = service.hits / requests
    print(f"\nupstream attempts / client requests = {service.hits}/{requests} = {ratio:.2f}")
    assert ratio <= 1.2


async def test_each_service_has_a_retry_budget_of_its_own(fake_service, gateway, tokens: TokenFactory):
    failing, healthy = await fake_service(2), await fake_service(1)
    for instance in failing.instances:
        instance.mode = "fail"
    client = await gateway(failing, breaker_failures=10_000, extra_routes=(("/api/v1/other", healthy.name),))
    # Retries the healthy service's traffic earned, with one budget for all.
    for _ in range(100):
        async with client.get("/api/v1/other", headers=tokens.headers()) as r:
            assert r.status == 200
    requests = 20
    for _ in range(requests):
        async with client.get("/api/v1/things", headers=tokens.headers()) as r:
            assert r.status == 500
    # Its own 20%: 24 attempts, where the shared budget allowed 40.
    assert failing.hits <= 1.2 * requests
