"""The rate limiter while its Redis is away: found out once, never waited on again, and noticed back."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from devstack.config import StackConfig
from mesh_common.testing import eventually
from mesh_common.testing.proxy import TcpProxy
from mesh_gateway.outage import FIRST_WAIT, RateLimiterUnavailable
from mesh_gateway.ratelimit import Limits, RateLimiter

from .conftest import GATEWAY_REDIS_DB, SilentServer
from .test_redis_script_transports import accepts_on, start_redis, stop_redis

TIMEOUT = 0.2
UNLIMITED = 10**9


@pytest.fixture
async def limiter() -> AsyncIterator[Callable[..., RateLimiter]]:
    """A limiter on a Redis at a loopback port or a URL, with a deadline (``TIMEOUT``) and keys of its own."""
    made: list[RateLimiter] = []

    def make(port_or_url: int | str, timeout: float = TIMEOUT) -> RateLimiter:
        url = port_or_url if isinstance(port_or_url, str) else f"redis://127.0.0.1:{port_or_url}/{GATEWAY_REDIS_DB}"
        limits = Limits(UNLIMITED, UNLIMITED, UNLIMITED)
        made.append(RateLimiter(url, limits, prefix=f"rl-{uuid.uuid4().hex[:8]}", timeout=timeout))
        return made[-1]

    yield make
    for rl in made:
        rl.close()
    await asyncio.sleep(0)  # let the transports finish closing


async def check(rl: RateLimiter, ip: str) -> None:
    """One check by a client with no counts in hand, which must go to Redis for them."""
    async with asyncio.timeout(5):
        await rl.check(ip=ip, user=None, auth_route=False)


async def test_a_silent_redis_is_waited_on_once_then_checks_fail_at_once(silent_server: SilentServer, limiter):
    rl = limiter(silent_server.port)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(RateLimiterUnavailable):
        await check(rl, "192.0.2.1")
    assert TIMEOUT <= loop.time() - started < 2
    started = loop.time()
    for n in range(20):
        with pytest.raises(RateLimiterUnavailable):
            await check(rl, f"198.51.100.{n}")
    # Each used to wait out the deadline again, on a connection of its own:
    # 20 deadlines in all. Under one, a slow minute's stalls included.
    assert loop.time() - started < TIMEOUT
    # One probe went meanwhile, and no other: each connection made has been given up on by now.
    await eventually(lambda: silent_server.given_up == 2, within=2)
    assert silent_server.accepted == 2


async def test_checks_queued_behind_a_failing_call_fail_with_it(silent_server: SilentServer, limiter):
    # A longer deadline than the others': sent again, the queued check would
    # wait a whole one more, and half of one is room for a slow minute.
    deadline = 1.0
    rl = limiter(silent_server.port, timeout=deadline)
    loop = asyncio.get_running_loop()
    first = asyncio.create_task(check(rl, "192.0.2.2"))
    await eventually(lambda: silent_server.accepted == 1, within=2)  # its call is in flight
    queued_at = loop.time()
    with pytest.raises(RateLimiterUnavailable):
        await check(rl, "192.0.2.3")
    # Not sent again once the first failed, to wait out a deadline of its own.
    assert loop.time() - queued_at < 1.5 * deadline
    with pytest.raises(RateLimiterUnavailable):
        await first
    assert silent_server.accepted == 1


async def test_checks_pass_again_within_the_wait_once_redis_answers(infra: StackConfig, limiter):
    proxy = TcpProxy(infra.ports.redis)
    try:
        await proxy.start()
        rl = limiter(proxy.port)
        await check(rl, "192.0.2.4")  # connected
        proxy.freeze()  # Redis's process stopped: connections stay, and nothing comes back
        with capture_logs() as logs:
            with pytest.raises(RateLimiterUnavailable):
                await check(rl, "192.0.2.5")
            with pytest.raises(RateLimiterUnavailable):
                await check(rl, "192.0.2.6")  # its probe goes, and waits on the frozen proxy
            # Back: what the frozen connections held is dropped, as a restart would.
            await proxy.cut()
            await proxy.start()
            loop = asyncio.get_running_loop()
            back_at = loop.time()
            failed = 0
            for n in range(200):  # every 20 ms, 4 s at most
                assert loop.time() - back_at < 4, f"still refused after {failed} checks"
                try:
                    await check(rl, f"203.0.113.{n}")
                    break
                except RateLimiterUnavailable:
                    failed += 1
                    await asyncio.sleep(0.02)
            else:
                pytest.fail(f"still refused after {failed} checks")
            # At most the failed probe's deadline, its wait, then a probe's round trip.
            print(f"\nchecks passed again {loop.time() - back_at:.2f} s after Redis came back")
            assert loop.time() - back_at < TIMEOUT + FIRST_WAIT + 0.3
        events = [e["event"] for e in logs if e["event"].startswith("rate_limiter")]
        assert events == ["rate_limiter_down", "rate_limiter_back"]  # once each, not per check
        (back,) = [e for e in logs if e["event"] == "rate_limiter_back"]
        assert back["unchecked"] == 2 + failed
    finally:
        await proxy.close()


@pytest.fixture
def unwritable_redis(tmp_path: Path) -> Iterator[Path]:
    """A Redis that answers, and refuses every write, as one out of memory or a replica does."""
    path = tmp_path / "redis.sock"
    process = start_redis(
        tmp_path, "--unixsocket", str(path), "--min-replicas-to-write", "1", ready=lambda: accepts_on(path)
    )
    try:
        yield path
    finally:
        stop_redis(process)


async def test_a_redis_that_answers_but_refuses_writes_is_not_taken_for_back(unwritable_redis: Path, limiter):
    rl = limiter(f"unix://{unwritable_redis}")
    redis = aioredis.Redis(unix_socket_path=str(unwritable_redis))
    loop = asyncio.get_running_loop()
    try:
        with capture_logs() as logs:
            with pytest.raises(RateLimiterUnavailable, match="NOREPLICAS"):
                await check(rl, "192.0.2.7")
            # Each sends the probe, while one is due: a call that writes, as
            # every draw does. One that did not would pass, and the limiter
            # would go back to Redis, to fail again, check after check.
            until = loop.time() + 0.3
            while loop.time() < until:
                with pytest.raises(RateLimiterUnavailable):
                    await check(rl, "192.0.2.8")
                await asyncio.sleep(0.02)
        assert [e["event"] for e in logs if e["event"].startswith("rate_limiter")] == ["rate_limiter_down"]
        stats = await redis.info("commandstats")
        assert stats["cmdstat_evalsha"]["calls"] == 2  # the draw, and one probe
    finally:
        await redis.aclose()


async def test_reads_let_through_while_redis_is_away_are_logged_once(fake_service, gateway, tokens):
    service = await fake_service(1)
    client = await gateway(service, redis_url="redis://127.0.0.1:1/0")  # nothing listens there
    with capture_logs() as logs:
        for _ in range(10):
            async with client.get("/api/v1/things", headers=tokens.headers()) as r:
                assert r.status == 200
    assert [e["event"] for e in logs].count("rate_limiter_unavailable_failing_open") == 1
    assert [e["event"] for e in logs].count("rate_limiter_down") == 1
