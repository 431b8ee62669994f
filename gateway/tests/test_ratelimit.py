"""The rate limiter against a real Redis: exact under bursts, one call per batch, leases drawn ahead."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from devstack.config import StackConfig
from mesh_common.testing import fresh_rate_window
from mesh_gateway import leases
from mesh_gateway.leases import LEASE_MAX
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

    def make(
        *, per_ip: int = UNLIMITED, per_user: int = UNLIMITED, prefix: str | None = None, **kwargs: object
    ) -> RateLimiter:
        prefix = prefix or f"rl-{uuid.uuid4().hex[:8]}"  # the same prefix: two gateways' view of one Redis
        made.append(RateLimiter(url, Limits(per_ip, per_user, UNLIMITED), prefix=prefix, **kwargs))  # type: ignore[arg-type]
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


async def test_a_lease_decides_most_checks_without_redis(redis, limiter):
    rl = limiter(prefix=(prefix := f"rl-{uuid.uuid4().hex[:8]}"))
    scripts = await calls(redis, "evalsha") + await calls(redis, "eval")
    remaining = [(await rl.check(ip="192.0.2.20", user=None, auth_route=False)).remaining for _ in range(100)]
    scripts = await calls(redis, "evalsha") + await calls(redis, "eval") - scripts
    drawn = int(await redis.get(f"{prefix}:ip:192.0.2.20:{int(time.time() // 60)}") or 0)
    print(f"\n100 checks one after the other: {scripts} script call(s), {drawn} counts drawn")
    assert scripts == -(-100 // LEASE_MAX)  # a lease of LEASE_MAX at a time, not a call each
    assert remaining == [UNLIMITED - n for n in range(1, 101)]  # each its own count, in order
    assert drawn < 100 + LEASE_MAX


async def test_two_gateways_never_exceed_a_limit_that_leases_are_drawn_from(limiter):
    limit = 1000
    prefix = f"rl-{uuid.uuid4().hex[:8]}"
    gateways = [limiter(per_ip=limit, prefix=prefix), limiter(per_ip=limit, prefix=prefix)]
    accepted = 0
    for n in range(limit + 100):  # alternately, as a random pick spreads one client's requests
        accepted += (await gateways[n % 2].check(ip="198.51.100.20", user=None, auth_route=False)).allowed
    print(f"\naccepted {accepted} of {limit + 100} with a limit of {limit} across 2 leasing gateways")
    assert accepted <= limit
    # Refused early by at most what the other gateway still holds; leases shrink near the limit.
    assert accepted >= limit - LEASE_MAX


async def test_a_small_limit_is_drawn_one_count_at_a_time(limiter):
    limit = 20  # under twice LEASE_SHARE: a lease of one count, exact across gateways
    prefix = f"rl-{uuid.uuid4().hex[:8]}"
    gateways = [limiter(per_ip=limit, prefix=prefix), limiter(per_ip=limit, prefix=prefix)]
    allowed = [
        (await gateways[n % 2].check(ip="198.51.100.21", user=None, auth_route=False)).allowed for n in range(30)
    ]
    assert allowed == [True] * limit + [False] * 10


async def test_past_the_limit_a_gateway_refuses_without_asking_redis(redis, limiter):
    rl = limiter(per_ip=100)
    decisions = [await rl.check(ip="192.0.2.21", user=None, auth_route=False) for _ in range(100)]
    assert all(d.allowed for d in decisions)
    assert not (await rl.check(ip="192.0.2.21", user=None, auth_route=False)).allowed
    scripts = await calls(redis, "evalsha")
    later = [await rl.check(ip="192.0.2.21", user=None, auth_route=False) for _ in range(20)]
    assert not any(d.allowed for d in later)
    assert {d.remaining for d in later} == {0}
    assert await calls(redis, "evalsha") == scripts  # the counter cannot fall back within its window


async def until_a_script_is_held(redis: aioredis.Redis) -> None:
    """Until a script call is in Redis's hands, held by a CLIENT PAUSE (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3
    while not any("b" in c["flags"] and c["cmd"] == "evalsha" for c in await redis.client_list()):
        assert loop.time() < deadline, "no script call reached Redis"
        await asyncio.sleep(0.01)


async def test_checks_that_queue_while_a_draw_is_in_flight_share_its_lease(redis, limiter):
    rl = limiter(per_user=10**6)  # what each decision says is where the new user stands
    await rl.check(ip="192.0.2.22", user="someone", auth_route=False)  # connected, and a lease for the IP
    scripts = await calls(redis, "evalsha")
    await redis.execute_command("CLIENT", "PAUSE", 5000, "WRITE")  # holds the next script call
    try:
        first = asyncio.create_task(rl.check(ip="192.0.2.22", user="someone else", auth_route=False))
        await until_a_script_is_held(redis)  # its draw for the new user is in flight
        later = [
            asyncio.create_task(rl.check(ip="192.0.2.22", user="someone else", auth_route=False)) for _ in range(10)
        ]
        await asyncio.sleep(0)  # each runs up to its wait
        assert not any(task.done() for task in [first, *later])
    finally:
        await redis.execute_command("CLIENT", "UNPAUSE")
    decisions = await asyncio.gather(first, *later)
    assert [d.remaining for d in decisions] == [10**6 - n for n in range(1, 12)]
    assert await calls(redis, "evalsha") - scripts == 1  # the ten took theirs from the lease it drew


async def test_a_new_window_starts_from_nothing(redis, limiter):
    now = [time.time()]
    rl = limiter(per_ip=50, clock=lambda: now[0])
    first = await rl.check(ip="192.0.2.23", user=None, auth_route=False)
    now[0] += 60  # the next window: whatever is left of the lease is void
    scripts = await calls(redis, "evalsha")
    second = await rl.check(ip="192.0.2.23", user=None, auth_route=False)
    assert first.remaining == second.remaining == 49
    assert await calls(redis, "evalsha") - scripts == 1


async def test_a_client_address_that_is_not_utf8_is_counted_like_any_other(limiter):
    # aiohttp hands header bytes that are not UTF-8 over as lone surrogates.
    rl = limiter(per_ip=2)
    async with asyncio.timeout(2):  # the limiter once stopped answering anyone after such a key
        allowed = [(await rl.check(ip="\udcff", user=None, auth_route=False)).allowed for _ in range(3)]
        assert allowed == [True, True, False]
        assert (await rl.check(ip="192.0.2.24", user="u", auth_route=False)).allowed


async def test_a_full_lease_table_loses_no_counts(limiter, monkeypatch):
    monkeypatch.setattr(leases, "LEASES_KEPT", 2)
    limit = 600
    rl = limiter(per_ip=limit)
    await rl.check(ip="192.0.2.25", user=None, auth_route=False)  # one lease; room for one more
    await asyncio.gather(*(rl.check(ip=ip, user=None, auth_route=False) for ip in ("192.0.2.26", "192.0.2.27")))
    allowed = 1 + sum([(await rl.check(ip="192.0.2.27", user=None, auth_route=False)).allowed for _ in range(limit)])
    assert allowed == limit  # one gateway: exactly the limit, however its table filled


async def test_a_draw_that_reaches_redis_after_its_window_ended_still_counts_in_it(limiter):
    # This gateway's clock is half a second behind Redis's: by Redis's time
    # the window it counts in has ended.
    behind = int(time.time() // 60) * 60 - 0.5
    rl = limiter(per_ip=5, clock=lambda: behind)
    allowed = [(await rl.check(ip="192.0.2.28", user=None, auth_route=False)).allowed for _ in range(10)]
    assert allowed == [True] * 5 + [False] * 5


async def test_a_gateway_whose_clock_is_windows_behind_redis_still_limits(redis, limiter):
    # Ten minutes slow: the end of its window, taken as a time on Redis's
    # clock, would already be past, and its counters would expire as made.
    prefix = f"rl-{uuid.uuid4().hex[:8]}"
    rl = limiter(per_ip=5, prefix=prefix, clock=lambda: time.time() - 600)
    allowed = [(await rl.check(ip="192.0.2.29", user=None, auth_route=False)).allowed for _ in range(10)]
    assert allowed == [True] * 5 + [False] * 5
    [key] = await redis.keys(f"{prefix}:ip:192.0.2.29:*")
    assert 60_000 < await redis.pttl(key) <= 120_000  # the rest of its window, and one more
