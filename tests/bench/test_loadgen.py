"""The benchmarks' fixed-rate load generator, against a real aiohttp server on loopback.

Its figures are only as good as its schedule and its clock: these check that
requests go out when due, that each latency is counted from then, and that
the trace (which the login-storm bench splits into calm and storm slices)
lists exactly the requests recorded.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from pathlib import Path

import pytest
from aiohttp import web

from mesh_common.testing import communicate_within

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import loadgen

RATE = 200
SECONDS = 1.0
WARM_UP = 0.2  # sent at the same rate, not recorded
SENT = int(RATE * WARM_UP) + int(RATE * SECONDS)


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    """Built before any test's clock starts: on a fresh machine the first build takes a while."""
    loadgen()


async def run_loadgen(url: str, *extra: str) -> tuple[int, dict[str, object], str]:
    args = [
        str(loadgen()),
        "-url",
        url,
        "-rate",
        str(RATE),
        "-duration",
        f"{SECONDS}s",
        "-warmup",
        f"{WARM_UP}s",
        *extra,
    ]
    child = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await communicate_within(child, 30)
    assert child.returncode is not None
    return child.returncode, json.loads(out), err.decode()


async def test_trace_lists_every_recorded_request_when_due(aiohttp_server) -> None:
    seen: list[str] = []

    async def slow(request: web.Request) -> web.Response:
        seen.append(request.headers.get("X-Probe", ""))
        await asyncio.sleep(0.02)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/slow", slow)
    server = await aiohttp_server(app)
    started = time.time() * 1000

    code, report, err = await run_loadgen(str(server.make_url("/slow")), "-trace", "-H", "X-Probe: yes")

    assert code == 0, err
    samples = report["samples"]
    assert isinstance(samples, list)
    assert report["recorded"] == len(samples) == RATE * SECONDS
    assert set(seen) == {"yes"} and len(seen) == SENT
    dues = sorted(due for due, _ in samples)
    assert started < dues[0] < started + 5_000  # Unix ms, the caller's clock
    gaps = [later - earlier for earlier, later in itertools.pairwise(dues)]
    assert min(gaps) > 0.9 * 1000 / RATE and max(gaps) < 1.1 * 1000 / RATE  # the schedule, not the answers
    # Counted from when due: never less than the handler's own 20 ms.
    assert all(latency >= 20 for _, latency in samples)


async def test_requests_reach_the_server_when_due_not_a_millisecond_late(aiohttp_server) -> None:
    # Go's time.Sleep, with nothing else to run, waits in epoll_wait's whole
    # milliseconds: requests left up to 1 ms late (0.5 ms at the median), and
    # the lateness was counted as the server's latency.
    arrivals: list[float] = []

    async def ok(_: web.Request) -> web.Response:
        arrivals.append(time.time() * 1000)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/ok", ok)
    server = await aiohttp_server(app)

    # Few connections, all made in the warm-up: no recorded request waits for a connect.
    code, report, err = await run_loadgen(str(server.make_url("/ok")), "-trace", "-conns", "4")

    assert code == 0, err
    samples = report["samples"]
    assert isinstance(samples, list)
    dues = sorted(due for due, _ in samples)
    # The recorded requests are the last ones sent, each one arrival of the server's.
    lateness = sorted(arrived - due for arrived, due in zip(sorted(arrivals)[-len(dues) :], dues, strict=True))
    assert lateness[len(lateness) // 2] < 0.3  # ms; the server's own wake-up is most of it
    assert lateness[len(lateness) // 10] > -0.05  # nor early, for the most part


async def test_no_trace_unless_asked_and_an_error_status_fails_the_run(aiohttp_server) -> None:
    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def gone(_: web.Request) -> web.Response:
        return web.Response(status=404)

    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/gone", gone)
    server = await aiohttp_server(app)

    code, report, _ = await run_loadgen(str(server.make_url("/ok")))
    assert code == 0 and "samples" not in report and report["recorded"] == RATE * SECONDS

    code, report, err = await run_loadgen(str(server.make_url("/gone")), "-trace")
    assert code == 1 and report["errors"] == SENT and "status 404" in err
