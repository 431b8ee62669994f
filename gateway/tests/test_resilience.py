"""Passive health: breakers, retries on another instance, a retry budget, deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import Iterator

import aiohttp
import pytest
import structlog
from structlog.testing import capture_logs

from mesh_common.resilience import BreakerBoard, UpstreamFailure
from mesh_common.testing import TokenFactory, eventually
from mesh_gateway.keys import BREAKERS
from mesh_gateway.upstream import Upstream as UpstreamClient


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


@contextlib.contextmanager
def unanswered_port() -> Iterator[int]:
    """A loopback port whose connections hang: its accept queue is full, and never drained."""
    with socket.socket() as listener, contextlib.ExitStack() as fillers:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        for _ in range(3):
            filler = fillers.enter_context(socket.socket())
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        yield port


async def test_an_instance_that_never_answers_the_connect_is_a_504(fake_service, gateway, tokens, consul):
    service = await fake_service(1)
    (instance,) = service.instances
    with unanswered_port() as port:
        moved = {"Name": service.name, "ID": instance.service_id, "Address": "127.0.0.1", "Port": port}
        async with consul.put(
            "/v1/agent/service/register", json={**moved, "Check": {"TTL": "60s", "Status": "passing"}}
        ):
            pass
        client = await gateway(service)
        async with client.get("/api/v1/things", headers=tokens.headers()) as r:
            assert r.status == 504  # a timeout, connecting: not "could not be reached"
            assert (await r.json())["code"] == "UPSTREAM_TIMEOUT"


async def test_breaker_opens_on_5xx_and_half_opens_after_recovery(fake_service, gateway, tokens):
    service = await fake_service(1)
    (instance,) = service.instances
    instance.mode = "fail"
    # Long enough for the next request to find it still open on a slow minute.
    client = await gateway(service, breaker_failures=3, breaker_recovery=2.0)
    breakers = client.app[BREAKERS]
    for _ in range(3):
        async with client.get("/api/v1/things", headers=tokens.headers()) as r:
            assert r.status == 500
    assert breakers.is_open(instance.service_id)

    hits = instance.hits
    async with client.get("/api/v1/things", headers=tokens.headers()) as r:
        assert r.status == 503
        assert (await r.json())["code"] == "UPSTREAM_CIRCUIT_OPEN"
        assert int(r.headers["Retry-After"]) >= 1
    assert instance.hits == hits  # an open breaker sends nothing

    instance.mode = "ok"
    await eventually(lambda: breakers.state(instance.service_id) == "half_open")
    async with client.get("/api/v1/things", headers=tokens.headers()) as r:
        assert r.status == 200  # the trial call went through and closed it
    assert breakers.state(instance.service_id) == "closed"


async def test_4xx_never_opens_a_breaker(fake_service, gateway, tokens):
    service = await fake_service(1)
    (instance,) = service.instances
    instance.mode = "client_error"
    client = await gateway(service, breaker_failures=2)
    breakers = client.app[BREAKERS]
    for _ in range(5):
        async with client.get("/api/v1/things", headers=tokens.headers()) as r:
            assert r.status == 409  # the upstream's answer, passed on
    assert instance.hits == 5  # every one reached the instance: nothing was cut off
    assert breakers.failures(instance.service_id) == 0
    assert not breakers.is_open(instance.service_id)


async def test_a_busy_instance_passes_its_503_on_and_keeps_its_breaker_closed(fake_service, gateway, tokens):
    # A login rush fills the user-service's hashing slots: its 503s with
    # Retry-After shed logins. Counted as failures, they would open the
    # instance's breaker and refuse its reads, refreshes and logouts too.
    service = await fake_service(1)
    (instance,) = service.instances
    instance.mode = "busy"
    client = await gateway(service, breaker_failures=2)
    breakers = client.app[BREAKERS]
    for _ in range(5):
        async with client.post("/api/v1/things", json={}, headers=tokens.headers()) as r:
            assert r.status == 503
            assert r.headers["Retry-After"] == "1"
            assert (await r.json())["code"] == "TOO_BUSY"  # the instance's own answer, not the gateway's
    assert instance.hits == 5
    assert breakers.failures(instance.service_id) == 0
    assert not breakers.is_open(instance.service_id)


async def test_an_instance_whose_database_is_away_opens_its_breaker(fake_service, gateway, tokens):
    # Its 503 carries Retry-After too, but says the instance cannot serve:
    # only a load-shedding 503 (TOO_BUSY) is let off.
    service = await fake_service(1)
    (instance,) = service.instances
    instance.mode = "dependency_down"
    client = await gateway(service, breaker_failures=2)
    for _ in range(2):
        async with client.post("/api/v1/things", json={}, headers=tokens.headers()) as r:
            assert r.status == 503
    assert client.app[BREAKERS].is_open(instance.service_id)


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


async def test_upstream_timeout_is_504(fake_service, gateway, tokens):
    service = await fake_service(1)
    service.instances[0].mode = "hang"
    client = await gateway(service, route_timeout=0.3)
    async with client.post("/api/v1/things", json={}, headers=tokens.headers()) as r:
        assert r.status == 504
        assert (await r.json())["code"] == "UPSTREAM_TIMEOUT"


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


async def test_request_id_and_forwarded_headers_reach_the_upstream(fake_service, gateway, tokens):
    service = await fake_service(1)
    client = await gateway(service)
    headers = {**tokens.headers(), "X-Request-ID": "req-123", "Connection": "keep-alive, X-Secret", "X-Secret": "s"}
    async with client.get("/api/v1/things/deep?x=1", headers=headers) as r:
        body = await r.json()
        assert r.headers["X-Request-ID"] == "req-123"
    assert body["request_id"] == "req-123"
    assert body["path"] == "/things/deep"
    assert body["forwarded_for"]


async def test_an_x_forwarded_for_the_client_names_in_connection_is_dropped(fake_service, gateway, tokens):
    service = await fake_service(1)
    client = await gateway(service)
    headers = {**tokens.headers(), "Connection": "keep-alive, X-Forwarded-For", "X-Forwarded-For": "6.6.6.6"}
    async with client.get("/api/v1/things", headers=headers) as r:
        body = await r.json()
    assert body["forwarded_for"] == "127.0.0.1"  # the gateway's own entry alone


async def test_a_streamed_answer_carries_the_request_id(fake_service, gateway, tokens):
    service = await fake_service(1)
    service.instances[0].mode = "large"  # 1 MiB: streamed, from an upstream that does not echo the id
    client = await gateway(service)
    async with client.get("/api/v1/things", headers={**tokens.headers(), "X-Request-ID": "r-1"}) as r:
        assert len(await r.read()) == 1024 * 1024
        assert r.headers["X-Request-ID"] == "r-1"


@pytest.mark.parametrize("sent", [None, "has spaces", "x" * 129, "ok\u00e9"])
async def test_a_missing_or_unsafe_request_id_is_replaced_by_one_of_the_gateways(fake_service, gateway, tokens, sent):
    service = await fake_service(1)
    client = await gateway(service)
    headers = tokens.headers() | ({} if sent is None else {"X-Request-ID": sent})
    async with client.get("/api/v1/things", headers=headers) as r:
        body = await r.json()
        returned = r.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", returned)  # 128 random bits
    assert body["request_id"] == returned  # the upstream got the same one


async def test_each_request_is_one_access_log_line_naming_its_upstream(fake_service, gateway, tokens):
    service = await fake_service(1)
    (instance,) = service.instances
    client = await gateway(service)
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        async with client.get("/api/v1/things", headers={**tokens.headers(), "X-Request-ID": "one-line"}) as r:
            assert r.status == 200
            await r.read()
    (line,) = [e for e in logs if e["event"] == "request"]
    assert line["request_id"] == "one-line"
    assert line["upstream"] == instance.service_id
    assert line["status"] == 200
    assert line["method"] == "GET" and line["path"] == "/api/v1/things"
    assert line["duration_ms"] >= 0


async def test_an_upstream_dying_mid_body_cuts_the_client_and_counts_against_its_breaker(fake_service, gateway, tokens):
    service = await fake_service(1)
    (instance,) = service.instances
    instance.mode = "truncate"
    client = await gateway(service)
    with pytest.raises(aiohttp.ClientPayloadError):
        async with client.get("/api/v1/things", headers=tokens.headers()) as r:
            assert r.status == 200  # the status line was already out
            await r.read()
    assert client.app[BREAKERS].failures(instance.service_id) == 1


def test_the_breaker_board_forgets_breakers_that_hold_no_state():
    board = BreakerBoard(failure_threshold=1)
    with contextlib.suppress(UpstreamFailure), board.breaker("failing"):
        raise UpstreamFailure("boom")
    for n in range(3 * BreakerBoard.PRUNE_AT):  # instances come and go
        with board.breaker(f"instance-{n}"):
            pass
    assert board.size <= BreakerBoard.PRUNE_AT
    assert board.is_open("failing")


async def test_a_half_open_instance_gets_one_probe_not_every_request(fake_service, gateway, tokens):
    service = await fake_service(1)
    (instance,) = service.instances
    instance.mode = "fail"
    client = await gateway(service, breaker_failures=2, breaker_recovery=0.5, route_timeout=0.5)
    breakers = client.app[BREAKERS]
    for _ in range(2):
        async with client.get("/api/v1/things", headers=tokens.headers()) as r:
            assert r.status == 500
    instance.mode = "hang"  # still sick: the probe will time out
    await eventually(lambda: breakers.state(instance.service_id) == "half_open")
    hits = instance.hits

    async def one() -> int:
        async with client.get("/api/v1/things", headers=tokens.headers()) as r:
            return r.status

    statuses = await asyncio.gather(*(one() for _ in range(5)))
    assert instance.hits == hits + 1  # one probe; the others were not sent
    assert sorted(statuses) == [503, 503, 503, 503, 504]
    assert breakers.is_open(instance.service_id)  # the probe failed: open again


async def test_a_probe_that_streams_ends_once_its_head_came_back_well(fake_service, gateway, tokens):
    service = await fake_service(1)
    (instance,) = service.instances
    instance.mode = "fail"
    client = await gateway(service, breaker_failures=2, breaker_recovery=0.5)
    breakers = client.app[BREAKERS]
    for _ in range(2):
        async with client.get("/api/v1/things", headers=tokens.headers()) as r:
            assert r.status == 500
    instance.mode = "trickle"  # recovered, and answering with a long stream
    await eventually(lambda: breakers.state(instance.service_id) == "half_open")
    async with client.get("/api/v1/things", headers=tokens.headers()) as probe:
        assert probe.status == 200
        assert breakers.state(instance.service_id) == "closed"  # before its body has ended
        # A long download must not keep everyone else from the instance.
        async with client.get("/api/v1/things", headers=tokens.headers()) as other:
            assert other.status == 200
            instance.stop_trickle.set()
            await other.read()
        await probe.read()
    assert breakers.state(instance.service_id) == "closed"


async def test_a_full_pool_is_not_the_instances_failure_and_the_request_goes_elsewhere(fake_service, gateway, tokens):
    service = await fake_service(2)
    for instance in service.instances:
        instance.mode = "trickle"
    # One connection per instance: a long stream fills an instance's pool.
    client = await gateway(service, route_timeout=0.3, upstream=UpstreamClient(limit_per_host=1))
    breakers = client.app[BREAKERS]
    async with client.get("/api/v1/things", headers=tokens.headers()) as stream:
        busy = next(i for i in service.instances if i.service_id == stream.headers["X-Upstream-Instance"])
        (other,) = (i for i in service.instances if i is not busy)
        other.mode = "ok"
        met_full_pool = False
        for _ in range(30):  # until one pick has met the full pool: each is a coin toss
            with capture_logs() as logs:
                # A POST without a key is retried only if it was never sent.
                async with client.post("/api/v1/things", json={}, headers=tokens.headers()) as r:
                    assert r.status == 200
                    assert r.headers["X-Upstream-Instance"] == other.service_id
            if any(e["event"] == "upstream_pool_full" and e["upstream"] == busy.service_id for e in logs):
                met_full_pool = True
                break
        assert met_full_pool
        assert busy.hits == 1  # nothing more was sent to it
        assert breakers.failures(busy.service_id) == 0
        busy.stop_trickle.set()


async def test_a_timeout_after_a_wait_for_a_free_connection_is_not_the_instances_failure(fake_service, gateway, tokens):
    service = await fake_service(1)
    (slow,) = service.instances
    slow.mode = "slow"
    client = await gateway(service, route_timeout=1.0, upstream=UpstreamClient(limit_per_host=1))

    async def get() -> int:
        async with client.get("/api/v1/things", headers=tokens.headers()) as r:
            return r.status

    # One connection: the third request waits 0.8 s for it, and has 0.2 s
    # left for an instance that answers every request in 0.4 s.
    statuses = await asyncio.gather(get(), get(), get())
    assert statuses[0] == 200 and 504 in statuses
    assert client.app[BREAKERS].failures(slow.service_id) == 0


async def test_a_5xx_that_is_not_a_problem_is_a_502_problem(fake_service, gateway, tokens):
    service = await fake_service(1)
    service.instances[0].mode = "fail_plain"
    client = await gateway(service)
    async with client.get("/api/v1/things", headers=tokens.headers()) as r:
        assert r.status == 502
        assert r.content_type == "application/problem+json"
        assert (await r.json())["code"] == "BAD_GATEWAY"  # and no stack trace


async def test_a_5xx_too_large_to_hold_is_a_502_not_a_buffer(fake_service, gateway, tokens):
    service = await fake_service(1)
    (broken,) = service.instances
    broken.mode = "fail_huge"
    client = await gateway(service)
    async with client.get("/api/v1/things", headers=tokens.headers()) as r:
        assert r.status == 502
        assert r.content_type == "application/problem+json"
        assert len(await r.read()) < 4096
