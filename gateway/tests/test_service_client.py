"""``mesh_common.http.ServiceClient`` (the gateway's JWKS fetch uses it): retries and their budget."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from mesh_common.discovery import Instance, ServiceWatch
from mesh_common.http import HTTP_SESSION, ServiceClient, UpstreamStatusError, http_session_ctx
from mesh_common.resilience import BreakerBoard, RetryBudget, UpstreamFailure


async def failing_instances(
    aiohttp_server: AiohttpServer, count: int, *, delay: float = 0.0, well: str | None = None
) -> tuple[ServiceWatch, list[int]]:
    """``count`` instances that answer 500 (after ``delay``), in a watch set by hand; and their hit counts.

    ``well``: a 503 with that code instead, one that says the instance is well.
    """
    hits = [0] * count
    instances = []
    for n in range(count):

        async def fail(request: web.Request, n: int = n) -> web.Response:
            hits[n] += 1
            await asyncio.sleep(delay)
            if well:
                return web.json_response({"code": well}, status=503, headers={"Retry-After": "1"})
            return web.json_response({"code": "BOOM"}, status=500)

        app = web.Application()
        app.router.add_get("/{tail:.*}", fail)
        server = await aiohttp_server(app)
        assert server.port is not None  # started
        instances.append(Instance(f"svc-{n}", "127.0.0.1", server.port))
    watch = ServiceWatch(None, "svc")
    watch.instances = tuple(instances)
    return watch, hits


async def test_the_last_failure_spends_no_retry_budget(aiohttp_server):
    watch, hits = await failing_instances(aiohttp_server, 2)
    # Two retries in the window: one per call, if only retries spend it.
    budget = RetryBudget(ratio=0, minimum=2)
    async with aiohttp.ClientSession() as session:
        client = ServiceClient(session, {"svc": watch}, breakers=BreakerBoard(failure_threshold=100), budget=budget)
        for _ in range(2):
            with pytest.raises(UpstreamFailure):
                await client.get_json("svc", "/x")
    assert sum(hits) == 4  # each call: one attempt and one retry


async def test_with_no_other_instance_the_failure_itself_is_raised(aiohttp_server):
    watch, hits = await failing_instances(aiohttp_server, 1)
    async with aiohttp.ClientSession() as session:
        client = ServiceClient(session, {"svc": watch}, breakers=BreakerBoard(failure_threshold=100))
        with pytest.raises(UpstreamFailure, match="answered 500"):
            await client.get_json("svc", "/x")
    assert hits == [1]


@pytest.mark.parametrize("code", ["TOO_BUSY", "FEATURE_UNAVAILABLE"])
async def test_a_well_instance_declining_is_tried_past_but_its_breaker_hears_nothing(aiohttp_server, code):
    watch, hits = await failing_instances(aiohttp_server, 2, well=code)
    async with aiohttp.ClientSession() as session:
        breakers = BreakerBoard(failure_threshold=1)
        client = ServiceClient(session, {"svc": watch}, breakers=breakers)
        with pytest.raises(UpstreamFailure, match="declines for now"):
            await client.get_json("svc", "/x")
        assert hits == [1, 1]  # retried on the other instance, like a failure
        assert not breakers.is_open("svc-0") and not breakers.is_open("svc-1")


async def test_no_retry_with_too_little_of_the_deadline_left(aiohttp_server):
    # The first answer comes 0.25 s into a 0.3 s deadline: a retry would have
    # 50 ms, time out, and count against an instance that did nothing wrong.
    watch, hits = await failing_instances(aiohttp_server, 2, delay=0.25)
    async with aiohttp.ClientSession() as session:
        breakers = BreakerBoard(failure_threshold=100)
        client = ServiceClient(session, {"svc": watch}, breakers=breakers, deadline=0.3)
        # Its 500, or on a slow machine the deadline: either way, no retry.
        with pytest.raises(UpstreamFailure):
            await client.get_json("svc", "/x")
    assert sum(hits) == 1


async def test_an_answer_that_is_not_json_is_the_instances_failure(aiohttp_server):
    async def garbled(request: web.Request) -> web.Response:
        return web.Response(text="<html>proxy error</html>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/{tail:.*}", garbled)
    server = await aiohttp_server(app)
    watch = ServiceWatch(None, "svc")
    watch.instances = (Instance("svc-0", "127.0.0.1", server.port),)
    async with aiohttp.ClientSession() as session:
        breakers = BreakerBoard(failure_threshold=100)
        client = ServiceClient(session, {"svc": watch}, breakers=breakers)
        # Not a ValueError escaping as a bug: a failure, retried and counted like a 5xx.
        with pytest.raises(UpstreamFailure, match="JSONDecodeError"):
            await client.get_json("svc", "/x")


async def test_a_4xx_whatever_its_body_is_the_callers_answer_not_the_instances_failure(aiohttp_server):
    hits = 0

    async def not_found(request: web.Request) -> web.Response:
        nonlocal hits
        hits += 1
        return web.Response(status=404, text="404: Not Found")  # aiohttp's own, or a proxy's

    app = web.Application()
    app.router.add_get("/{tail:.*}", not_found)
    server = await aiohttp_server(app)
    watch = ServiceWatch(None, "svc")
    watch.instances = (Instance("svc-0", "127.0.0.1", server.port), Instance("svc-1", "127.0.0.1", server.port))
    async with aiohttp.ClientSession() as session:
        client = ServiceClient(session, {"svc": watch}, breakers=BreakerBoard(failure_threshold=1))
        with pytest.raises(UpstreamStatusError) as raised:
            await client.get_json("svc", "/x")
    assert (raised.value.status, raised.value.body) == (404, "404: Not Found")
    assert hits == 1  # not retried elsewhere
    assert client.breakers.failures("svc-0") == client.breakers.failures("svc-1") == 0


async def test_waiting_for_a_pooled_connection_is_not_the_instances_failure(aiohttp_server):
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(1.2)  # longer than the 1 s a connection may take
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/{tail:.*}", slow)
    server = await aiohttp_server(app)
    watch = ServiceWatch(None, "svc")
    watch.instances = (Instance("svc-0", "127.0.0.1", server.port),)
    services = web.Application()
    # The session every service uses, with a pool of two connections: the
    # third call waits 1.2 s for one, well inside its 4 s deadline.
    async with http_session_ctx(limit_per_host=2)(services):
        client = ServiceClient(services[HTTP_SESSION], {"svc": watch}, deadline=4.0)
        answers = await asyncio.gather(*(client.get_json("svc", "/x") for _ in range(3)), return_exceptions=True)
        assert answers == [{"ok": True}] * 3
        assert client.breakers.failures("svc-0") == 0
