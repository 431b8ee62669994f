"""Passive health: which answers count against an instance's breaker, and how a half-open one is probed.

The breaker board's own rules, call by call, are in ``test_breakers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import aiohttp
import pytest
from structlog.testing import capture_logs

from mesh_common.testing import eventually
from mesh_gateway.keys import BREAKERS, UPSTREAM
from mesh_gateway.upstream import Upstream as UpstreamClient


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


@pytest.mark.parametrize(
    ("mode", "code", "retry_after"), [("busy", "TOO_BUSY", "1"), ("feature_down", "FEATURE_UNAVAILABLE", "5")]
)
async def test_a_well_instance_passes_its_503_on_and_keeps_its_breaker_closed(
    fake_service, gateway, tokens, mode, code, retry_after
):
    # TOO_BUSY: a login rush fills the user-service's hashing slots, and its
    # 503s shed logins. FEATURE_UNAVAILABLE: its throttle's Redis is away,
    # and only logins are refused. Counted as failures, either would open the
    # instance's breaker and refuse its reads, refreshes and logouts too.
    service = await fake_service(1)
    (instance,) = service.instances
    instance.mode = mode
    client = await gateway(service, breaker_failures=2)
    breakers = client.app[BREAKERS]
    for _ in range(5):
        async with client.post("/api/v1/things", json={}, headers=tokens.headers()) as r:
            assert r.status == 503
            assert r.headers["Retry-After"] == retry_after
            assert (await r.json())["code"] == code  # the instance's own answer, not the gateway's
    assert instance.hits == 5
    assert breakers.failures(instance.service_id) == 0
    assert not breakers.is_open(instance.service_id)
    instance.mode = "ok"
    async with client.get("/api/v1/things", headers=tokens.headers()) as r:
        assert r.status == 200  # its other routes still reach it
    assert instance.hits == 6


async def test_a_well_instances_503_to_a_head_keeps_its_breaker_closed(fake_service, gateway, tokens):
    # A HEAD's answer has no body, so no code to read: a monitor's HEADs to
    # an instance shedding logins opened its breaker, and its reads were refused.
    service = await fake_service(1)
    (instance,) = service.instances
    instance.mode = "busy"
    client = await gateway(service, breaker_failures=2)
    for _ in range(5):
        async with client.head("/api/v1/things", headers=tokens.headers()) as r:
            assert (r.status, r.headers["Retry-After"]) == (503, "1")  # the instance's, passed on
    assert instance.hits == 5
    assert client.app[BREAKERS].failures(instance.service_id) == 0
    instance.mode = "ok"
    async with client.get("/api/v1/things", headers=tokens.headers()) as r:
        assert r.status == 200


async def test_an_instance_whose_database_is_away_opens_its_breaker(fake_service, gateway, tokens):
    # Its 503 carries Retry-After too, but says the instance cannot serve:
    # only a 503 whose code says the instance is well is let off.
    service = await fake_service(1)
    (instance,) = service.instances
    instance.mode = "dependency_down"
    client = await gateway(service, breaker_failures=2)
    for _ in range(2):
        async with client.post("/api/v1/things", json={}, headers=tokens.headers()) as r:
            assert r.status == 503
    assert client.app[BREAKERS].is_open(instance.service_id)


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


async def test_a_half_open_instance_gets_one_probe_not_every_request(fake_service, gateway, tokens):
    service = await fake_service(1)
    (instance,) = service.instances
    instance.mode = "fail"
    # A recovery long enough that the breaker the failed probe opens again is
    # still open when the statuses are in, on a slow minute too.
    client = await gateway(service, breaker_failures=2, breaker_recovery=2.0, route_timeout=0.5)
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

    # One connection: the others wait for it, but a wait that leaves less
    # than the least budget a service is told, and its way back (1 s), is
    # given up, unsent. (A timeout once one was sent, in test_deadline_budget.)
    statuses = await asyncio.gather(get(), get(), get())
    assert statuses[0] == 200 and 504 in statuses
    assert client.app[BREAKERS].failures(slow.service_id) == 0


async def test_a_body_late_after_a_wait_for_a_free_connection_is_not_the_instances_failure(
    fake_service, gateway, tokens
):
    # As a late head is, above: this head came in time, but the small body
    # read with it did not, within what the wait for our connection had left.
    service = await fake_service(1)
    (instance,) = service.instances
    instance.mode = "late_body"
    client = await gateway(service, route_timeout=2.0, upstream=UpstreamClient(limit_per_host=1))

    async def get() -> int:
        async with client.get("/api/v1/things", headers=tokens.headers()) as r:
            return r.status

    first = asyncio.ensure_future(get())
    await eventually(lambda: instance.hits == 1)  # it holds the one connection, for 0.5 s
    # The second waits that long for it, leaving 1.5 s: enough to be sent, not for a 3 s body.
    assert [*await asyncio.gather(first, get())] == [200, 504]
    assert client.app[BREAKERS].failures(instance.service_id) == 0


async def test_a_connect_cut_short_by_a_wait_for_a_free_connection_is_not_the_instances_failure(
    fake_service, gateway, tokens, consul
):
    # One connection to the instance, busy; the answer that frees it closes
    # it (as a HEAD's, a cut stream's, a timed-out one's are), so the request
    # waiting for it must connect anew, with what its wait left before it
    # must be sent (the deadline less the budget a service is told at
    # least, and its way back: 1 s): less than the 1.5 s a connect may take
    # here. The instance is slow to accept (its accept queue is full), which
    # a connect given its own 1.5 s would be blamed for; this one had less,
    # because of our queue.
    service = await fake_service(1)
    (instance,) = service.instances
    loop = asyncio.get_running_loop()
    with socket.socket() as listener, contextlib.ExitStack() as fillers:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        listener.setblocking(False)
        port = int(listener.getsockname()[1])
        moved = {"Name": service.name, "ID": instance.service_id, "Address": "127.0.0.1", "Port": port}
        check = {"TTL": "60s", "Status": "passing"}
        async with consul.put("/v1/agent/service/register", json={**moved, "Check": check}) as r:
            assert r.status == 200
        upstream = UpstreamClient(limit_per_host=1, connect_timeout=1.5)
        client = await gateway(service, route_timeout=2.0, upstream=upstream)

        async def get() -> int:
            async with client.get("/api/v1/things", headers=tokens.headers()) as r:
                return r.status

        first = asyncio.create_task(get())
        conn, _ = await asyncio.wait_for(loop.sock_accept(listener), 5)
        received = b""
        while b"\r\n\r\n" not in received:
            received += await asyncio.wait_for(loop.sock_recv(conn, 4096), 5)
        for _ in range(3):  # nothing more is accepted: once the queue is full, connects hang
            filler = fillers.enter_context(socket.socket())
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        second = asyncio.create_task(get())
        pool = client.app[UPSTREAM]._pools[("127.0.0.1", port)]
        await eventually(lambda: bool(pool._slots._waiters))  # queued for the one connection

        def answer() -> None:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
            conn.close()

        # Held a while, so that the wait leaves the next connect less than its 0.5 s.
        loop.call_later(0.25, answer)
        assert await first == 200
        assert await second == 504
    assert client.app[BREAKERS].failures(instance.service_id) == 0
