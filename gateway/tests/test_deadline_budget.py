"""The time a request has left, told to the service, so that the gateway never gives up on what the service then does.

The gateway's clock starts before it has a connection to the instance; a
service's when its middleware runs. A request that waited for one of the
gateway's connections was cut by the gateway (a 504, not retried for a
POST) while the service, which aiohttp does not stop when its caller hangs
up, went on and committed. The fake service here runs the real deadline
middleware (mesh_common.deadlines), and is served as in production: its
handlers run on after the gateway hangs up.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from mesh_common.app import service_app
from mesh_common.deadlines import BUDGET_HEADER, DEADLINE, before_commit
from mesh_common.problems import DependencyUnavailable
from mesh_common.testing import eventually, loopback_service
from mesh_gateway.keys import BREAKERS
from mesh_gateway.proxy import BUDGET, RETURN_MARGIN
from mesh_gateway.upstream import Upstream as UpstreamClient

from .conftest import ServedLikeProduction

ROUTE = 3.0  # the route's timeout, for the routes' 5 s
OWN = 2.7  # the service's own deadline, as its 4.5 s is to 5 s
WORK = 2.0  # what a change takes: within OWN, not within what a 1.5 s wait leaves the gateway


@dataclass
class Ledger:
    """What the fake service saw: per change, when it came and the budget headers it carried."""

    holding: int = 0  # requests holding the gateway's one connection now
    received: list[tuple[float, list[str], float]] = field(default_factory=list)  # (at, headers, deadline)
    commits: list[float] = field(default_factory=list)
    ended: int = 0  # changes whose handler has ended, however


@pytest.fixture
async def committing_service(consul: aiohttp.ClientSession) -> AsyncIterator[tuple[str, Ledger]]:
    """A service: ``GET /things/hold?s=`` holds its connection, ``POST /things`` commits after ``work`` seconds.

    ``POST /things?dependency_down`` answers 503 DEPENDENCY_UNAVAILABLE at once.
    """
    ledger = Ledger()
    loop = asyncio.get_running_loop()

    async def hold(request: web.Request) -> web.Response:
        ledger.holding += 1
        try:
            await asyncio.sleep(float(request.query["s"]))
        finally:
            ledger.holding -= 1
        return web.json_response({})

    async def change(request: web.Request) -> web.Response:
        ledger.received.append((loop.time(), request.headers.getall(BUDGET_HEADER, []), request[DEADLINE]))
        try:
            if "dependency_down" in request.query:  # its database away: a 503 at once, whatever the budget
                raise DependencyUnavailable(headers={"Retry-After": "1"})
            if "slow_commit" in request.query:
                before_commit()  # a COMMIT begun in time, and slow: let finish, whatever the deadline
            await asyncio.sleep(float(request.query.get("work", WORK)))
            before_commit()  # as mesh_common.transactions does, before its COMMIT
            ledger.commits.append(loop.time())
        finally:
            ledger.ended += 1
        return web.json_response({}, status=201)

    name = f"budget-{uuid.uuid4().hex[:8]}"
    app = service_app(loopback_service(name, "http://127.0.0.1:1"), deadline=OWN)
    app.router.add_get("/things/hold", hold)
    app.router.add_post("/things", change)
    server = ServedLikeProduction(app)
    await server.start_server()
    registration = {
        "Name": name,
        "ID": f"{name}-0",
        "Address": "127.0.0.1",
        "Port": server.port,
        "Check": {"TTL": "60s", "Status": "passing", "DeregisterCriticalServiceAfter": "1m"},
    }
    try:
        async with consul.put("/v1/agent/service/register", json=registration) as r:
            assert r.status == 200, await r.text()
        yield name, ledger
    finally:
        async with consul.put(f"/v1/agent/service/deregister/{name}-0"):
            pass
        await server.close()


@asynccontextmanager
async def connection_held(client: Any, ledger: Ledger, tokens: Any, seconds: float) -> AsyncIterator[None]:
    """The gateway's one connection to the instance, held ``seconds`` by a read that must end 200."""
    held = asyncio.create_task(client.get(f"/api/v1/things/hold?s={seconds}", headers=tokens.headers()))
    try:
        await eventually(lambda: ledger.holding == 1)
        yield
    except BaseException:
        held.cancel()
        raise
    async with await held as r:
        assert r.status == 200


async def test_a_change_that_waited_for_a_connection_is_cut_by_the_service_not_committed_after_a_504(
    committing_service, gateway, tokens
):
    # One connection, held 1.5 s by a read: the change waits for it, and
    # has 1.5 s of the gateway's 3 s left. Its work fits the service's own
    # 2.7 s; told only its own, the service committed at 3.5 s, after the
    # gateway's 504 at 3 s (a POST without a key: not retried).
    name, ledger = committing_service
    client = await gateway(name, route_timeout=ROUTE, upstream=UpstreamClient(limit_per_host=1))
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(15):
        async with connection_held(client, ledger, tokens, 1.5):
            sent_at = loop.time()
            async with client.post("/api/v1/things", json={}, headers=tokens.headers()) as r:
                status, body = r.status, await r.json(content_type=None)
        await eventually(lambda: ledger.ended == 1, within=10)  # the service is done with it, however
    assert not (status == 504 and ledger.commits), f"the gateway answered 504, and the service committed: {body}"
    ((received_at, told, deadline),) = ledger.received
    assert len(told) == 1, told
    # Told no more than the gateway had left: its clock started after sent_at.
    assert received_at + int(told[0]) / 1000 <= sent_at + ROUTE
    assert deadline == pytest.approx(received_at + int(told[0]) / 1000, abs=0.05)  # the sooner of the two
    assert (status, body["code"]) == (503, "DEPENDENCY_UNAVAILABLE")  # rolled back, and says so in time
    assert ledger.commits == []
    # Out of what our own queue left it: no more the instance's failure than a QueuedTimeout is.
    assert client.app[BREAKERS].failures(f"{name}-0") == 0


async def test_a_503_to_a_request_that_waited_for_a_connection_counts_if_it_came_before_its_budget_ran_out(
    committing_service, gateway, tokens
):
    # Its database away, the service answers at once, with most of the budget
    # our queue left it still to run: that cannot be the budget's doing, and
    # exempt, a failing instance that is busy too would never be routed around.
    name, ledger = committing_service
    client = await gateway(name, route_timeout=ROUTE, upstream=UpstreamClient(limit_per_host=1))
    async with asyncio.timeout(15):
        async with (
            connection_held(client, ledger, tokens, 0.5),
            client.post("/api/v1/things?dependency_down", json={}, headers=tokens.headers()) as r,
        ):
            assert r.status == 503
            assert (await r.json())["code"] == "DEPENDENCY_UNAVAILABLE"
    ((_, told, _),) = ledger.received
    # It waited (told less than the 2.5 s it would have been), and answered with over 1.5 s left.
    assert 1500 < int(told[0]) < (ROUTE - RETURN_MARGIN - 0.3) * 1000
    assert client.app[BREAKERS].failures(f"{name}-0") == 1


async def test_a_request_a_wait_for_a_connection_left_too_little_is_not_sent(committing_service, gateway, tokens):
    # 2.2 s of the gateway's 3 s spent waiting: what is left, less the way
    # back, is under what a service can do anything useful in.
    assert BUDGET.margin + BUDGET.least > ROUTE - 2.2
    name, ledger = committing_service
    client = await gateway(name, route_timeout=ROUTE, upstream=UpstreamClient(limit_per_host=1))
    async with asyncio.timeout(15):
        async with (
            connection_held(client, ledger, tokens, 2.2),
            client.post("/api/v1/things?work=0", json={}, headers=tokens.headers()) as r,
        ):
            assert r.status == 504
            assert (await r.json())["code"] == "UPSTREAM_TIMEOUT"  # nothing was sent: its outcome is known
    assert ledger.received == []


async def test_a_service_is_told_the_gateways_budget_never_a_clients(committing_service, gateway, tokens):
    name, ledger = committing_service
    client = await gateway(name, route_timeout=ROUTE)
    for sent in ("1", "999999999"):
        headers = {**tokens.headers(), BUDGET_HEADER: sent}
        async with client.post("/api/v1/things?work=0", json={}, headers=headers) as r:
            assert r.status == 201
    for _, told, _ in ledger.received:
        assert len(told) == 1, told
        # The route's 3 s, less the way back, less what the gateway took to send it.
        assert (ROUTE - RETURN_MARGIN - 0.2) * 1000 <= int(told[0]) <= (ROUTE - RETURN_MARGIN) * 1000


async def test_a_change_the_gateway_gave_up_on_after_a_wait_is_an_unknown_outcome_and_no_failure(
    committing_service, gateway, tokens
):
    # What the budget cannot prevent: a COMMIT begun in time and let finish
    # takes longer than the way back allows. The POST was sent and is not
    # safe to repeat, so the 504 says so; the instance had only what our own
    # queue left it, so it is not blamed.
    name, ledger = committing_service
    client = await gateway(name, route_timeout=ROUTE, upstream=UpstreamClient(limit_per_host=1))
    async with asyncio.timeout(15):
        async with (
            connection_held(client, ledger, tokens, 0.5),
            client.post("/api/v1/things?slow_commit&work=3", json={}, headers=tokens.headers()) as r,
        ):
            assert r.status == 504
            problem = await r.json()
            assert problem["code"] == "UPSTREAM_OUTCOME_UNKNOWN"
            assert "Retry-After" not in r.headers
        await eventually(lambda: ledger.ended == 1, within=10)
    assert len(ledger.commits) == 1  # as it may: the client was told to read it back
    assert client.app[BREAKERS].failures(f"{name}-0") == 0
