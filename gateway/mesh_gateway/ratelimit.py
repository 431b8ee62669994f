"""Rate limits in Redis: atomic, one round trip, shared by every gateway.

A fixed-window counter per (scope, client) in a Lua script: each request
increments every key that applies to it (its client IP, its user, and the
auth bucket for login and registration) and is refused if any is over its
limit. The script runs atomically in Redis, so limits hold across gateway
instances. Refused requests still count: a client hammering past its limit
keeps itself limited.

When Redis is unreachable the gateway fails *open for reads* (GET, HEAD,
OPTIONS) so browsing survives a cache outage, and *closed for writes*, which
are the abuse we limit for (credential stuffing, spam). See docs/gateway.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import NoScriptError

log = structlog.get_logger()

# One call checks a whole batch of requests. KEYS: every request's counters,
# in order. ARGV, per request: how many keys it has, when its window ends
# (Unix ms), then each key's limit. Keys expire at the end of their window,
# so their TTL is exactly the time to reset. Returns, per request and for its
# tightest limit: allowed (1/0), remaining, ms to reset, limit.
_SCRIPT = """
local results, k, a = {}, 1, 1
while a <= #ARGV do
  local n, window_end = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  local allowed, best_remaining, best_reset, best_limit = 1, nil, 0, 0
  for _ = 1, n do
    local key, limit = KEYS[k], tonumber(ARGV[a])
    k, a = k + 1, a + 1
    local count = redis.call('INCR', key)
    if count == 1 then redis.call('PEXPIREAT', key, window_end) end
    local ttl = redis.call('PTTL', key)
    local remaining = limit - count
    if remaining < 0 then allowed = 0 end
    if best_remaining == nil or remaining < best_remaining then
      best_remaining, best_reset, best_limit = remaining, ttl, limit
    end
  end
  results[#results + 1] = {allowed, math.max(best_remaining, 0), best_reset, best_limit}
end
return results
"""

READS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class Limits:
    per_ip: int
    per_user: int
    auth_per_ip: int
    window_seconds: int = 60


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_seconds: int

    def headers(self) -> dict[str, str]:
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_seconds),
        }


class RateLimiterUnavailable(Exception):
    """Redis did not answer; the caller decides whether to fail open."""


class RateLimiter:
    """Checks limits in Redis, batching the checks of concurrent requests.

    At most one script call is in flight. Checks that arrive meanwhile queue
    up and go together in the next one, so batches grow with the load (one
    command for many requests) and an idle gateway adds no delay. The script
    runs atomically in Redis and checks each request on its own, so limits
    are exactly as strict as unbatched; only the gateway's overhead shrinks.
    """

    def __init__(self, redis: aioredis.Redis, limits: Limits, *, prefix: str = "rl", timeout: float = 0.5) -> None:
        self._redis = redis
        self._limits = limits
        self._prefix = prefix
        self._timeout = timeout
        self._sha = hashlib.sha1(_SCRIPT.encode()).hexdigest()
        self._pending: list[tuple[list[str], list[int], asyncio.Future[list[int]]]] = []
        self._in_flight: asyncio.Task[None] | None = None

    async def check(self, *, ip: str, user: str | None, auth_route: bool) -> Decision:
        limits = self._limits
        window = limits.window_seconds
        slot = int(time.time() // window)
        keys = [f"{self._prefix}:ip:{ip}:{slot}"]
        caps = [limits.per_ip]
        if user is not None:
            keys.append(f"{self._prefix}:user:{user}:{slot}")
            caps.append(limits.per_user)
        if auth_route:
            keys.append(f"{self._prefix}:auth:{ip}:{slot}")
            caps.append(limits.auth_per_ip)
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[list[int]] = loop.create_future()
        if not self._pending and self._in_flight is None:
            # Flush once the requests already in this turn have queued theirs.
            loop.call_soon(self._flush)
        self._pending.append((keys, [len(keys), (slot + 1) * window * 1000, *caps], answer))
        allowed, remaining, reset_ms, limit = await answer
        return Decision(
            allowed=bool(allowed),
            limit=int(limit),
            remaining=int(remaining),
            reset_seconds=max(1, math.ceil(int(reset_ms) / 1000)),
        )

    def _flush(self, _done: asyncio.Task[None] | None = None) -> None:
        self._in_flight = None
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        # Held until done (so it is not collected mid-flight); when it is,
        # whatever queued meanwhile goes next.
        self._in_flight = asyncio.create_task(self._run(batch))
        self._in_flight.add_done_callback(self._flush)

    async def _run(self, batch: list[tuple[list[str], list[int], asyncio.Future[list[int]]]]) -> None:
        keys = [key for keys, _, _ in batch for key in keys]
        args = [arg for _, args, _ in batch for arg in args]
        results: list[Any] | Exception
        try:
            # One deadline for the whole batch, not one timer per request.
            async with asyncio.timeout(self._timeout):
                try:
                    results = await self._redis.evalsha(self._sha, len(keys), *keys, *args)
                except NoScriptError:
                    # Redis restarted or flushed its scripts: nothing ran.
                    await self._redis.script_load(_SCRIPT)
                    results = await self._redis.evalsha(self._sha, len(keys), *keys, *args)
        except (aioredis.RedisError, OSError, TimeoutError) as exc:
            results = exc
        for index, (_, _, answer) in enumerate(batch):
            if answer.done():  # its caller has gone (the client disconnected)
                continue
            if isinstance(results, Exception):
                answer.set_exception(RateLimiterUnavailable(type(results).__name__))
            else:
                answer.set_result(results[index])
