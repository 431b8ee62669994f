"""Rate limits in Redis: atomic, one round trip, shared by every gateway.

A fixed-window counter per (scope, client): each request counts against
every key that applies to it (its client IP, its user, and the auth bucket
for login and registration) and is refused if any is over its limit. The
counters are incremented by one Lua script, atomically in Redis, so limits
hold across gateway instances. Refused requests still count: a client
hammering past its limit keeps itself limited.

When Redis is unreachable the gateway fails *open for reads* (GET, HEAD,
OPTIONS) so browsing survives a cache outage, and *closed for writes*, which
are the abuse we limit for (credential stuffing, spam). See docs/gateway.md.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

from .redis_script import RedisScript, Reply

# KEYS: distinct counters. ARGV, per key: how many hits to add, then when its
# window ends (Unix ms). A counter new in this window expires when the window
# does. Returns each counter's new total.
_SCRIPT = """
local totals = {}
for i, key in ipairs(KEYS) do
  local hits = tonumber(ARGV[2 * i - 1])
  local total = redis.call('INCRBY', key, hits)
  if total == hits then redis.call('PEXPIREAT', key, ARGV[2 * i]) end
  totals[i] = total
end
return totals
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


# One request's check: its counters, their limits, when its window ends, and
# where its decision goes.
_Check = tuple[list[str], list[int], int, "asyncio.Future[Decision]"]


class RateLimiter:
    """Checks limits in Redis, batching the checks of concurrent requests.

    At most one script call is in flight. Checks that arrive meanwhile queue
    up and go together in the next one, so batches grow with the load and an
    idle gateway adds no delay. A counter that several queued requests share
    (a busy user, an IP behind a NAT: the clients a limit is for) goes to
    Redis once, with the number of hits to add. Its new total tells which
    counts those requests drew, in queue order, so each is judged exactly as
    if it had incremented the counter alone.

    No task runs in between: a batch is written to Redis from a plain
    callback, and decided from the turn of the loop that reads the answer.
    """

    def __init__(self, redis_url: str, limits: Limits, *, prefix: str = "rl", timeout: float = 0.5) -> None:
        self._redis = RedisScript(redis_url, _SCRIPT, timeout=timeout, name="gateway-rate-limiter")
        self._limits = limits
        self._prefix = prefix
        self._pending: list[_Check] = []
        self._in_flight = False

    def close(self) -> None:
        self._redis.close()

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
        answer: asyncio.Future[Decision] = loop.create_future()
        if not self._pending and not self._in_flight:
            # Sent once the requests already in this turn of the loop have
            # queued theirs: one call for all of them rather than one each.
            loop.call_soon(self._send)
        self._pending.append((keys, caps, (slot + 1) * window * 1000, answer))
        return await answer

    def _send(self) -> None:
        batch, self._pending = self._pending, []
        hits: dict[str, int] = {}
        ends: dict[str, int] = {}
        for keys, _, window_end, _ in batch:
            for key in keys:
                hits[key] = hits.get(key, 0) + 1
                ends[key] = window_end
        self._in_flight = True
        self._redis.call(
            list(hits),
            [arg for key in hits for arg in (hits[key], ends[key])],
            lambda reply: self._decide(batch, hits, reply),
        )

    def _decide(self, batch: list[_Check], hits: dict[str, int], reply: Reply) -> None:
        self._in_flight = False
        if self._pending:
            self._send()  # what queued meanwhile goes at once
        if isinstance(reply, Exception):
            for *_, answer in batch:
                if not answer.done():  # else its caller has gone (the client disconnected)
                    answer.set_exception(RateLimiterUnavailable(str(reply)))
            return
        # The count each counter stood at before this batch's first hit.
        counts = {key: int(total) - hits[key] for key, total in zip(hits, reply, strict=True)}
        now_ms = time.time() * 1000
        for keys, caps, window_end, answer in batch:
            allowed, remaining, limit = True, math.inf, 0
            for key, cap in zip(keys, caps, strict=True):
                counts[key] += 1
                left = cap - counts[key]
                if left < 0:
                    allowed = False
                if left < remaining:
                    remaining, limit = left, cap
            if not answer.done():
                reset = max(1, math.ceil((window_end - now_ms) / 1000))
                answer.set_result(Decision(allowed, limit, max(int(remaining), 0), reset))
