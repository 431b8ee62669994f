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

import math
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
import structlog

log = structlog.get_logger()

# KEYS: one counter per limit. ARGV: window (ms), then each key's limit.
# Returns, for the tightest limit: allowed (1/0), remaining, ms to reset, limit.
_SCRIPT = """
local window = tonumber(ARGV[1])
local allowed, best_remaining, best_reset, best_limit = 1, nil, 0, 0
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[i + 1])
  local count = redis.call('INCR', key)
  if count == 1 then redis.call('PEXPIRE', key, window) end
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
    def __init__(self, redis: aioredis.Redis, limits: Limits, *, prefix: str = "rl") -> None:
        self._redis = redis
        self._limits = limits
        self._prefix = prefix
        self._script = redis.register_script(_SCRIPT)

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
        try:
            allowed, remaining, reset_ms, limit = await self._script(keys=keys, args=[window * 1000, *caps])
        except (aioredis.RedisError, OSError) as exc:
            raise RateLimiterUnavailable(type(exc).__name__) from exc
        return Decision(
            allowed=bool(allowed),
            limit=int(limit),
            remaining=int(remaining),
            reset_seconds=max(1, math.ceil(int(reset_ms) / 1000)),
        )
