"""The rate limiter against a real Redis: exact under bursts, one call per batch."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from devstack.config import StackConfig
from mesh_common.testing import fresh_rate_window
from mesh_gateway.ratelimit import Limits, RateLimiter

from .conftest import GATEWAY_REDIS_DB

UNLIMITED = 10**9


@pytest.fixture
async def redis(infra: StackConfig) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(f"redis://127.0.0.1:{infra.ports.redis}/{GATEWAY_REDIS_DB}")
    yield client
    await client.aclose()


@pytest.fixture
async def limiter(redis: aioredis.Redis) -> AsyncIterator[Callable[..., RateLimiter]]:
    """Limiters on the same Redis database as ``redis``, each with keys of its own."""
    kwargs = redis.connection_pool.connection_kwargs
    url = f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs['db']}"
    made: list[RateLimiter] = []

    await fresh_rate_window()  # the tests expect exact counts within one window

    def make(*, per_ip: int = UNLIMITED, per_user: int = UNLIMITED) -> RateLimiter:
        made.append(RateLimiter(url, Limits(per_ip, per_user, UNLIMITED), prefix=f"rl-{uuid.uuid4().hex[:8]}"))
        return made[-1]

    yield make
    for rl in made:
        rl.close()
    await asyncio.sleep(0)  # let the transports finish closing


async def calls(redis: aioredis.Redis, command: str) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_a_burst_is_checked_exactly_in_one_script_call(redis, limiter):
    rl = limiter(per_ip=25)
    await rl.check(ip="192.0.2.1", user=None, auth_route=False)  # connects
    scripts, increments = await calls(redis, "evalsha"), await calls(redis, "incrby")
    decisions = await asyncio.gather(*(rl.check(ip="203.0.113.9", user=None, auth_route=False) for _ in range(60)))
    scripts, increments = await calls(redis, "evalsha") - scripts, await calls(redis, "incrby") - increments
    print(f"\n60 checks in {scripts} script call(s), {increments} counter increment(s)")
    # In queue order: the first 25 pass, with 24, 23, ... 0 left.
    assert [d.allowed for d in decisions] == [True] * 25 + [False] * 35
    assert [d.remaining for d in decisions[:25]] == list(range(24, -1, -1))
    assert scripts == 1
    assert increments == 1  # one counter, shared by the whole burst: sent once


async def test_each_request_in_a_batch_is_judged_on_its_own_keys(limiter):
    rl = limiter(per_ip=5, per_user=2)
    checks = [rl.check(ip="198.51.100.1", user=None, auth_route=False) for _ in range(8)]
    checks += [rl.check(ip="198.51.100.2", user=None, auth_route=False) for _ in range(3)]
    checks += [rl.check(ip="198.51.100.3", user="alice", auth_route=False) for _ in range(3)]
    allowed = [d.allowed for d in await asyncio.gather(*checks)]
    assert sum(allowed[:8]) == 5  # the first IP runs out
    assert all(allowed[8:11])  # the second does not notice
    assert sum(allowed[11:]) == 2  # the user's tighter limit wins over its IP's


async def test_checks_survive_redis_forgetting_the_script(redis, limiter):
    rl = limiter(per_ip=10)
    assert (await rl.check(ip="192.0.2.7", user=None, auth_route=False)).remaining == 9
    await redis.script_flush()  # as after a restart of Redis
    decision = await rl.check(ip="192.0.2.7", user=None, auth_route=False)
    assert decision.allowed
    assert decision.remaining == 8
