"""Discovery: the healthy set comes from a Consul watch, and the pick is uniform."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from mesh_common import discovery
from mesh_common.consul import consul_client
from mesh_common.discovery import MIN_POLL_GAP, WATCHES, ServiceWatch
from mesh_common.resilience import BreakerBoard
from mesh_common.testing import TokenFactory, eventually
from mesh_gateway.app import ready
from mesh_gateway.keys import BREAKERS

SPREAD_REQUESTS = 3000


async def test_each_request_picks_an_instance_uniformly_at_random(fake_service, gateway, tokens: TokenFactory):
    service = await fake_service(3)
    client = await gateway(service)
    headers = tokens.headers()
    served: Counter[str] = Counter()
    semaphore = asyncio.Semaphore(32)

    async def one() -> None:
        async with semaphore, client.get("/api/v1/things", headers=headers) as r:
            assert r.status == 200
            served[r.headers["X-Upstream-Instance"]] += 1

    await asyncio.gather(*(one() for _ in range(SPREAD_REQUESTS)))
    shares = {k: round(v / SPREAD_REQUESTS * 100, 1) for k, v in served.items()}
    print(f"\nshare per instance over {SPREAD_REQUESTS} requests (%): {shares}")
    assert set(served) == {i.service_id for i in service.instances}
    assert all(abs(share - 100 / 3) <= 5 for share in shares.values()), shares


async def test_an_instance_that_turns_critical_leaves_the_healthy_set_quickly(
    fake_service, gateway, check_status, tokens: TokenFactory
):
    """Time from Consul knowing an instance is critical to the gateway not choosing it."""
    service = await fake_service(2)
    client = await gateway(service)
    watch = client.app[WATCHES][service.name]
    victim = service.instances[0].service_id
    delays = []
    for _ in range(20):
        await check_status(victim, "passing")
        await eventually(lambda: victim in {i.id for i in watch.instances})
        started = time.perf_counter()
        await check_status(victim, "critical")
        await eventually(lambda: victim not in {i.id for i in watch.instances})
        delays.append((time.perf_counter() - started) * 1000)
    p50 = statistics.median(delays)
    p99 = statistics.quantiles(delays, n=100)[98]
    print(f"\nConsul critical -> gateway stops choosing: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    assert p50 <= 100

    # And requests follow the set: none reaches the critical instance.
    for _ in range(50):
        async with client.get("/api/v1/things", headers=tokens.headers()) as r:
            assert r.headers["X-Upstream-Instance"] != victim


async def test_no_healthy_instance_is_503_with_retry_after(fake_service, gateway, check_status, tokens: TokenFactory):
    service = await fake_service(1)
    client = await gateway(service)
    await check_status(service.instances[0].service_id, "critical")
    watch = client.app[WATCHES][service.name]
    await eventually(lambda: not watch.instances)
    async with client.get("/api/v1/things", headers=tokens.headers()) as r:
        assert r.status == 503
        assert r.headers["Retry-After"] == "1"
        assert r.content_type == "application/problem+json"
        assert (await r.json())["code"] == "NO_HEALTHY_UPSTREAM"


async def test_the_last_known_set_survives_consul_going_away_and_ready_says_so(aiohttp_server, aiohttp_client):
    """A fake Consul answers once, then fails: the watch keeps what it knew.

    The same instances, whether Consul answers or has been away for minutes:
    only the watch's failures, in /ready, tell the operator which.
    """
    answers = 0

    async def health(request: web.Request) -> web.Response:
        nonlocal answers
        answers += 1
        if answers > 1:
            return web.Response(status=500, text="consul is restarting")
        return web.json_response(consul_entries(2), headers={"X-Consul-Index": "7"})

    async with watching(aiohttp_server, health) as watch:
        app = web.Application()
        app[WATCHES], app[BREAKERS] = {"svc": watch}, BreakerBoard()
        app.router.add_get("/ready", ready)
        client = await aiohttp_client(app)
        assert await watch.wait_ready(5)
        known = watch.instances
        await eventually(lambda: answers >= 3)
        assert watch.instances == known and len(known) == 2
        assert BreakerBoard().pick(watch).id in {"svc-0", "svc-1"}
        body = await (await client.get("/ready")).json()
    assert body["status"] == "ready"
    assert [i["id"] for i in body["upstreams"]["svc"]] == ["svc-0", "svc-1"]
    assert body["discovery"]["svc"]["failures"] >= 2
    assert body["discovery"]["svc"]["answered_seconds_ago"] >= 0


def consul_entries(count: int) -> list[dict[str, Any]]:
    return [
        {"Node": {"Address": "127.0.0.1"}, "Service": {"ID": f"svc-{n}", "Address": "127.0.0.1", "Port": 1000 + n}}
        for n in range(count)
    ]


Health = Callable[[web.Request], Awaitable[web.Response]]


@asynccontextmanager
async def watching(aiohttp_server: AiohttpServer, health: Health, wait: float = 30.0) -> AsyncIterator[ServiceWatch]:
    """A watch of "svc" against a fake Consul that answers with ``health``."""
    app = web.Application()
    app.router.add_get("/v1/health/service/{name}", health)
    fake_consul = await aiohttp_server(app)
    client = consul_client(str(fake_consul.make_url("/")))
    watch = ServiceWatch(client, "svc", wait=wait)
    watch.start()
    try:
        yield watch
    finally:
        await watch.stop()
        await client.close()


async def test_an_answer_the_watch_cannot_read_does_not_end_it(aiohttp_server):
    answers = 0

    async def health(request: web.Request) -> web.Response:
        nonlocal answers
        answers += 1
        if answers == 2:  # a changed set, but an entry with no "Service"
            return web.json_response([{"Node": {"Address": "127.0.0.1"}}], headers={"X-Consul-Index": "8"})
        count = 2 if answers == 1 else 3
        return web.json_response(consul_entries(count), headers={"X-Consul-Index": str(6 + answers)})

    async with watching(aiohttp_server, health) as watch:
        assert await watch.wait_ready(5)
        await eventually(lambda: len(watch.instances) == 3)


@pytest.mark.parametrize("index", ["7", "0"])
async def test_an_index_that_does_not_move_does_not_make_the_watch_spin(aiohttp_server, index):
    """A Consul that answers at once with the same index (or 0) every time."""
    answers = 0

    async def health(request: web.Request) -> web.Response:
        nonlocal answers
        answers += 1
        return web.json_response(consul_entries(2), headers={"X-Consul-Index": index})

    async with watching(aiohttp_server, health) as watch:
        assert await watch.wait_ready(5)
        started = time.perf_counter()
        before = answers
        await eventually(lambda: answers >= before + 3)
        elapsed = time.perf_counter() - started
    # Three polls after the first take at least two gaps (timer slack aside).
    assert elapsed >= 2 * MIN_POLL_GAP * 0.9, f"{answers - before} polls in {elapsed:.3f} s"


async def test_an_index_of_0_is_sent_back_as_1_so_that_the_next_query_blocks(aiohttp_server):
    """Consul's guidance: an index below 1 is a Consul bug, and index=0 never blocks."""
    asked: list[str | None] = []

    async def health(request: web.Request) -> web.Response:
        asked.append(request.query.get("index"))
        return web.json_response(consul_entries(2), headers={"X-Consul-Index": "0"})

    async with watching(aiohttp_server, health) as watch:
        assert await watch.wait_ready(5)
        await eventually(lambda: len(asked) >= 2)
    assert asked[1] == "1", asked


async def test_a_query_consul_never_answers_is_given_up_and_sent_again(aiohttp_server, monkeypatch):
    # A frozen agent, or a half-open connection: the query neither answers nor fails.
    monkeypatch.setattr(discovery, "STALL_SLACK", 0.3)
    answers = 0

    async def health(request: web.Request) -> web.Response:
        nonlocal answers
        answers += 1
        if answers == 2:
            await asyncio.Event().wait()
        return web.json_response(consul_entries(min(answers, 2)), headers={"X-Consul-Index": str(6 + answers)})

    async with watching(aiohttp_server, health, wait=0.5) as watch:
        assert await watch.wait_ready(5)
        # The stuck query is dropped after its wait and the slack, not after
        # the HTTP client's own 300 s.
        await eventually(lambda: len(watch.instances) == 2, within=5)


async def test_after_consul_restarts_the_watch_sees_its_new_set_at_once(aiohttp_server):
    """Consul's blocking rules: a query for an index not passed yet is held for the wait."""
    state = {"index": 100, "count": 1}
    restarted = asyncio.Event()

    async def health(request: web.Request) -> web.Response:
        asked = int(request.query.get("index", "0"))
        if asked >= state["index"]:
            # Held until something changes: before the restart, the restart.
            change = restarted if state["index"] == 100 else asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(float(request.query["wait"].rstrip("s"))):
                    await change.wait()
            if restarted.is_set() and state["index"] == 100:
                state.update(index=3, count=2)  # in memory (-dev): its index starts over
                raise web.HTTPServiceUnavailable()  # the query it held, lost in the restart
        return web.json_response(consul_entries(state["count"]), headers={"X-Consul-Index": str(state["index"])})

    async with watching(aiohttp_server, health, wait=20.0) as watch:
        assert await watch.wait_ready(5)
        assert len(watch.instances) == 1
        restarted.set()
        # Not a whole wait later, as when the watch asked for its old index 100.
        await eventually(lambda: len(watch.instances) == 2, within=5)


@pytest.mark.parametrize("comes_back", [True, False])
async def test_a_restarted_agents_empty_set_is_not_believed_until_its_instances_could_register(
    aiohttp_server, monkeypatch, comes_back: bool
):
    # A -dev agent back from a restart answers an empty set until the
    # keepers have registered their instances again: believed, every route
    # was a 503 meanwhile. An instance that does not come back is dropped
    # once the grace is over.
    monkeypatch.setattr(discovery, "REJOIN_GRACE", 1.0)
    answers: list[str | None] = []
    empty_seen, registered = asyncio.Event(), asyncio.Event()

    async def health(request: web.Request) -> web.Response:
        answers.append(request.query.get("index"))
        if len(answers) == 1:
            return web.json_response(consul_entries(2), headers={"X-Consul-Index": "70"})
        if len(answers) == 2:
            raise web.HTTPServiceUnavailable()  # the restart
        if request.query.get("index") is None:
            empty_seen.set()
            return web.json_response([], headers={"X-Consul-Index": "3"})
        # Blocking on index 3, for no longer than the grace's rest.
        assert float(request.query["wait"].rstrip("s")) <= 1.0
        if comes_back:
            await registered.wait()
            return web.json_response(consul_entries(3), headers={"X-Consul-Index": "5"})
        await asyncio.sleep(float(request.query["wait"].rstrip("s")))
        return web.json_response([], headers={"X-Consul-Index": "3"})

    async with watching(aiohttp_server, health) as watch:
        assert await watch.wait_ready(5)
        known = watch.instances
        async with asyncio.timeout(10):
            await empty_seen.wait()
        await eventually(lambda: len(answers) >= 4)  # the query after the empty answer
        assert watch.instances == known  # kept, the empty answer not believed
        if comes_back:
            registered.set()
            await eventually(lambda: len(watch.instances) == 3, within=5)
        else:
            await eventually(lambda: watch.instances == (), within=5)


async def test_an_address_that_is_no_host_is_skipped_not_the_whole_set(aiohttp_server):
    # Consul takes any string as a service's address.
    async def health(request: web.Request) -> web.Response:
        entries = consul_entries(2)
        entries[1]["Service"]["Address"] = "[fd00::7]"  # brackets: not a host
        return web.json_response(entries, headers={"X-Consul-Index": "7"})

    async with watching(aiohttp_server, health) as watch:
        assert await watch.wait_ready(5)
        assert [i.id for i in watch.instances] == ["svc-0"]
