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

# KEYS: one counter per limit. ARGV: when the window ends (Unix ms), then each key's limit.
# Keys expire at the end of their window, so their TTL is exactly the time to reset.
# Returns, for the tightest limit: allowed (1/0), remaining, ms to reset, limit.
_SCRIPT = """
local window_end = tonumber(ARGV[1])
local allowed, best_remaining, best_reset, best_limit = 1, nil, 0, 0
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[i + 1])
  local count = redis.call('INCR', key)
  if count == 1 then redis.call('PEXPIREAT', key, window_end) end
  local ttl = redis.call('PTTL', key)
  local remaining = limit - count
  if remaining < 0 then allowed = 0 end
  if best_remaining == nil or remaining < best_remaining then
    best_remaining, best_reset, best_limit = remaining, ttl, limit
  end
end
return {allowed, math.max(best_remaining, 0), best_reset, best_limit}
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

    Requests that arrive together (one turn of the event loop) share one
    pipeline: one write and one read for all of them instead of one each.
    Each check is still its own atomic script call in Redis, so the limits
    are exactly as strict as unbatched; only the gateway's overhead shrinks.
    """

    def __init__(self, redis: aioredis.Redis, limits: Limits, *, prefix: str = "rl", timeout: float = 0.5) -> None:
        self._redis = redis
        self._limits = limits
        self._prefix = prefix
        self._timeout = timeout
        self._sha = hashlib.sha1(_SCRIPT.encode()).hexdigest()
        self._pending: list[tuple[list[str], list[int], asyncio.Future[list[int]]]] = []
        self._flushes: set[asyncio.Task[None]] = set()

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
        if not self._pending:
            # Flush once the requests already in this turn have queued theirs.
            loop.call_soon(self._flush)
        self._pending.append((keys, [(slot + 1) * window * 1000, *caps], answer))
        try:
            async with asyncio.timeout(self._timeout):
                allowed, remaining, reset_ms, limit = await answer
        except TimeoutError as exc:
            raise RateLimiterUnavailable("timeout") from exc
        return Decision(
            allowed=bool(allowed),
            limit=int(limit),
            remaining=int(remaining),
            reset_seconds=max(1, math.ceil(int(reset_ms) / 1000)),
        )

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.create_task(self._run(batch))
        self._flushes.add(task)  # held until done, so it is not collected mid-flight
        task.add_done_callback(self._flushes.discard)

    async def _run(self, batch: list[tuple[list[str], list[int], asyncio.Future[list[int]]]]) -> None:
        try:
            results = await self._evalsha(batch)
            if any(isinstance(r, NoScriptError) for r in results):
                # Redis restarted or flushed its scripts: nothing in the batch ran.
                await self._redis.script_load(_SCRIPT)
                results = await self._evalsha(batch)
        except (aioredis.RedisError, OSError) as exc:
            results = [exc] * len(batch)
        for (_, _, answer), result in zip(batch, results, strict=True):
            if answer.done():  # its caller timed out
                continue
            if isinstance(result, Exception):
                answer.set_exception(RateLimiterUnavailable(type(result).__name__))
            else:
                answer.set_result(result)

    async def _evalsha(self, batch: list[tuple[list[str], list[int], asyncio.Future[list[int]]]]) -> list[Any]:
        # Plain EVALSHA: redis-py's Script objects ask SCRIPT EXISTS before
        # every pipeline, a second round trip per batch.
        async with self._redis.pipeline(transaction=False) as pipe:
            for keys, args, _ in batch:
                pipe.evalsha(self._sha, len(keys), *keys, *args)
            return await pipe.execute(raise_on_error=False)  # type: ignore[no-any-return]
