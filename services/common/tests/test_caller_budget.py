"""A caller's budget (mesh_common.deadlines.BUDGET_HEADER): a request's deadline is the sooner of the service's and it.

The gateway tells a service how long it will wait, so that the service gives
up first; whatever else a header says must not break a request.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web

from mesh_common.app import service_app
from mesh_common.deadlines import BUDGET_HEADER, DEADLINE, MIN_BUDGET, caller_budget
from mesh_common.testing import loopback_service

SETTINGS = loopback_service("svc", "http://127.0.0.1:1")
OWN = 10.0  # the service's own deadline in these tests


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("2500", 2.5),
        ("0", MIN_BUDGET),  # too little to do anything in: the floor
        ("1", MIN_BUDGET),
        ("999999999", 999999.999),  # nine digits: longer than any service's own, which the middleware keeps
        (None, None),
        ("", None),
        ("-5", None),  # not a count of milliseconds: ignored, never a deadline already past
        ("1.5", None),
        ("2s", None),
        ("1e3", None),
        ("0x10", None),
        ("١٢٣", None),  # Arabic-Indic digits, which str.isdigit and int() take
        ("²", None),  # which str.isdigit takes, and int() refuses
        ("1" * 10, None),  # past nine digits: says nothing more
        ("9" * 5000, None),  # past what int() converts
    ],
)
def test_a_budget_is_a_count_of_milliseconds_with_a_floor(value: str | None, seconds: float | None) -> None:
    assert caller_budget(value) == seconds


async def deadline_of(aiohttp_client: Any, headers: dict[str, str]) -> float:
    """The seconds a request with ``headers`` is given, in a service whose own deadline is ``OWN``."""

    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"left": request[DEADLINE] - asyncio.get_running_loop().time()})

    app = service_app(SETTINGS, deadline=OWN)
    app.router.add_get("/", handler)
    client = await aiohttp_client(app)
    async with client.get("/", headers=headers) as response:
        assert response.status == 200
        left: float = (await response.json())["left"]
    return left


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("2000", 2.0),  # shorter than its own: the caller's
        ("60000", OWN),  # longer: its own
        ("999999999", OWN),
        ("0", MIN_BUDGET),
        ("-1", OWN),
        ("soon", OWN),
        ("9" * 5000, OWN),
    ],
)
async def test_a_request_has_the_sooner_of_its_own_deadline_and_its_callers(
    aiohttp_client: Any, value: str, seconds: float
) -> None:
    assert await deadline_of(aiohttp_client, {BUDGET_HEADER: value}) == pytest.approx(seconds, abs=0.1)


async def test_without_a_budget_a_request_has_its_own_deadline(aiohttp_client: Any) -> None:
    assert await deadline_of(aiohttp_client, {}) == pytest.approx(OWN, abs=0.1)


async def test_a_request_past_its_callers_budget_is_cut_as_at_its_own_deadline(aiohttp_client: Any) -> None:
    done = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        done.set()
        return web.json_response({})

    app = service_app(SETTINGS, deadline=OWN)
    app.router.add_post("/", handler)
    client = await aiohttp_client(app)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(4), client.post("/", headers={BUDGET_HEADER: "600"}) as response:
        assert response.status == 503
        assert response.headers["Retry-After"] == "1"
        assert (await response.json(content_type="application/problem+json"))["code"] == "DEPENDENCY_UNAVAILABLE"
    assert 0.5 < loop.time() - started < 2
    assert not done.is_set()
