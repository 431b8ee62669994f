"""Rate limits in Redis: atomic, shared by every gateway, mostly decided locally.

A fixed-window counter per (scope, client): each request counts against
every key that applies to it (its client IP, its user, and the auth bucket
for login and registration) and is refused if any is over its limit. The
counters live in Redis and are incremented by one Lua script, atomically,
so limits hold across gateway instances. Refused requests still count: a
client hammering past its limit keeps itself limited.

A gateway draws counts from Redis a few at a time (a *lease*) and hands
them out itself until they run out, so most requests never wait for Redis
(decision 4 in docs/decisions). A lease is at most 32 counts, and at most a
sixteenth of what was left under the limit, so limits under 32 are drawn
one count at a time, and so exactly. Counts drawn are never given
back: a limit is never exceeded, but a client may be refused up to a
lease's worth early while another gateway holds counts it has not used.

When Redis is unreachable, the counts in hand are still handed out; a
request that needs a draw fails *open for reads* (GET, HEAD, OPTIONS) so
browsing survives a cache outage, and *closed for writes*, which are the
abuse we limit for (credential stuffing, spam), save the few that keep a
session going (``RouteTable.session``), though never past an allowance
each gateway keeps per client IP itself (``unchecked_refusal``). See
docs/gateway.md. Once a call has failed, checks that need a draw fail at
once until a probe finds Redis back (outage.py): no request waits on a
Redis known to be down.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from .leases import Leases
from .outage import Allowance, Buckets, Outage, RateLimiterUnavailable, session_allowance
from .redis_script import RedisScript, Reply

# KEYS: distinct counters. ARGV, per key: how many counts to draw, then how
# long the counter may live (ms). Returns each counter's new total.
_SCRIPT = """
local totals = {}
for i, key in ipairs(KEYS) do
  local hits = tonumber(ARGV[2 * i - 1])
  local total = redis.call('INCRBY', key, hits)
  if total == hits then redis.call('PEXPIRE', key, ARGV[2 * i]) end
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


# How long Redis has to answer a call, and to take a connection: a call that
# connects first may wait twice this (its set-up gets a deadline of its own).
REDIS_TIMEOUT = 0.5
# The longest a check waits: behind a batch in flight that had to connect,
# then for its own draw on the connection that batch proved. A failed batch
# fails what queued behind it, and while Redis is down nothing waits at all.
LONGEST_CHECK = 3 * REDIS_TIMEOUT


@dataclass(slots=True, eq=False)
class _Check:
    """One request waiting for counts from Redis: 0 in ``counts`` is a count still to draw."""

    keys: list[str]
    caps: list[int]
    counts: list[int]
    window_end: int  # Unix ms
    answer: asyncio.Future[Decision]


def _judge(caps: list[int], counts: list[int], window_end: int, now: float) -> Decision:
    allowed, remaining, limit = True, math.inf, 0
    for cap, count in zip(caps, counts, strict=True):
        left = cap - count
        if left < 0:
            allowed = False
        if left < remaining:
            remaining, limit = left, cap
    reset = max(1, math.ceil(window_end / 1000 - now))
    return Decision(allowed, limit, max(int(remaining), 0), reset)


class RateLimiter:
    """Checks limits against counters in Redis, drawing counts ahead in leases.

    A request whose counters all have counts in hand is decided at once.
    The others queue for Redis, with at most one script call in flight;
    checks that arrive meanwhile go together in the next one, so batches
    grow with the load. Each counter goes to Redis once per call, with the
    number of counts to draw: those its queued requests need, or a lease if
    that is more. The new total tells which counts were drawn, and they are
    handed out in queue order, so each request is judged exactly as if it
    had incremented the counter alone.

    No task runs in between: a batch is written to Redis from a plain
    callback, and decided from the turn of the loop that reads the answer.
    """

    def __init__(
        self,
        redis_url: str,
        limits: Limits,
        *,
        prefix: str = "rl",
        timeout: float = REDIS_TIMEOUT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = RedisScript(redis_url, _SCRIPT, timeout=timeout, name="gateway-rate-limiter")
        self._limits = limits
        self._prefix = prefix
        self._clock = clock
        self._pending: list[_Check] = []
        self._in_flight = False
        self._leases = Leases()
        # A probe draws nothing from a counter of its own, but is a write like
        # any draw: a Redis refusing writes (out of memory, a replica) is down.
        probe = [f"{prefix}:probe"]
        self.outage = Outage(lambda on_reply: self._redis.call(probe, [0, 60_000], on_reply))
        # What a client IP gets through unchecked, from each gateway: a bucket
        # of the limit, refilled over a window, so never more than the limit
        # lets through (a fixed window also lets all of it go at once).
        self._unchecked_reads = Buckets(Allowance(limits.per_ip, limits.per_ip / limits.window_seconds))
        self._unchecked_sessions = Buckets(session_allowance(limits.per_ip, limits.window_seconds))

    def close(self) -> None:
        self.outage.close()
        self._redis.close()

    async def check(self, *, ip: str, user: str | None, auth_route: bool) -> Decision:
        now = self._clock()
        keys, caps, window_end = self._counters(now, ip, user, auth_route)
        self._leases.enter(window_end)
        counts = [self._leases.take(key, cap) for key, cap in zip(keys, caps, strict=True)]
        if 0 not in counts:
            return _judge(caps, counts, window_end, now)
        if self.outage.down:
            raise self.outage.unavailable()
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Decision] = loop.create_future()
        if not self._pending and not self._in_flight:
            # Sent once the requests already in this turn of the loop have
            # queued theirs: one call for all of them rather than one each.
            loop.call_soon(self._send)
        self._pending.append(_Check(keys, caps, counts, window_end, answer))
        return await answer

    def refused_in_hand(self, *, ip: str, auth_route: bool) -> Decision | None:
        """The refusal of a client already past a per-IP limit, as this gateway's leases tell; else None.

        Decided without Redis, and before anything costly is done for the
        request (a token's signature): a client past its limit must not
        have that work done for every request it is refused. It takes no
        count that could be allowed, so a request it lets by is counted by
        ``check`` exactly once; one it refuses counts, as every refusal does.
        While Redis is down, the limit is the IP's unchecked allowance.
        """
        if self.outage.down and (refused := self.unchecked_refusal(ip=ip, session=False, take=False)):
            self.outage.refused_unchecked(ip)
            return refused
        if not self._leases.capped:
            return None  # no count drawn yet reached a limit: the common case, at no cost
        now = self._clock()
        keys, caps, window_end = self._counters(now, ip, None, auth_route)
        if window_end != self._leases.window_end:
            return None  # a new window: nothing in hand yet
        over = [(key, cap) for key, cap in zip(keys, caps, strict=True) if self._leases.past(key, cap)]
        if not over:
            return None
        # Past its cap, a lease hands out counts without Redis, all refused.
        return _judge([cap for _, cap in over], [self._leases.take(key, cap) for key, cap in over], window_end, now)

    def unchecked_refusal(self, *, ip: str, session: bool, take: bool = True) -> Decision | None:
        """While Redis is down, the refusal of a request from ``ip`` past its allowance; else None.

        A ``session`` write takes from an allowance of its own; anything
        else (a read, a request refused for its token) from the IP's. Not
        ``take``, it only looks.

        Decided by this gateway alone, so each of N gateways grants it:
        a client spread over them gets N times as much through.
        """
        buckets = self._unchecked_sessions if session else self._unchecked_reads
        wait = buckets.take(ip) if take else buckets.wait(ip)
        if not wait:
            return None
        return Decision(allowed=False, limit=buckets.allowance.burst, remaining=0, reset_seconds=math.ceil(wait))

    def _counters(self, now: float, ip: str, user: str | None, auth_route: bool) -> tuple[list[str], list[int], int]:
        """The counters a request counts against, their limits, and the end of their window (Unix ms)."""
        limits = self._limits
        window = limits.window_seconds
        slot = int(now // window)
        keys = [f"{self._prefix}:ip:{ip}:{slot}"]
        caps = [limits.per_ip]
        if user is not None:
            keys.append(f"{self._prefix}:user:{user}:{slot}")
            caps.append(limits.per_user)
        if auth_route:
            keys.append(f"{self._prefix}:auth:{ip}:{slot}")
            caps.append(limits.auth_per_ip)
        return keys, caps, (slot + 1) * window * 1000

    def _send(self) -> None:
        batch, self._pending = self._pending, []
        draws: dict[str, int] = {}
        ends: dict[str, int] = {}
        caps: dict[str, int] = {}
        for check in batch:
            for key, cap, count in zip(check.keys, check.caps, check.counts, strict=True):
                if count == 0:
                    draws[key] = draws.get(key, 0) + 1
                    ends[key], caps[key] = check.window_end, cap
        kept = self._leases.ahead(draws, caps)
        # A counter outlives its window by another: a draw that reaches Redis
        # late (in flight at the turn) must find its window's count, not start
        # one afresh. Its lifetime is relative, measured on this gateway's
        # clock: an expiry time told to Redis would be read on Redis's clock,
        # and from a gateway more than a window behind it, every counter it
        # made would expire at once, and it would never refuse anyone.
        window = self._limits.window_seconds * 1000
        now = int(self._clock() * 1000)
        args = [arg for key in draws for arg in (draws[key], ends[key] + window - now)]
        self._in_flight = True
        try:
            self._redis.call(list(draws), args, lambda reply: self._decide(batch, draws, ends, caps, kept, reply))
        except Exception as exc:  # nothing went out; left in flight, the limiter would wait forever
            self._decide(batch, draws, ends, caps, kept, exc)

    def _decide(
        self,
        batch: list[_Check],
        draws: dict[str, int],
        ends: dict[str, int],
        caps: dict[str, int],
        kept: set[str],
        reply: Reply,
    ) -> None:
        self._in_flight = False
        if isinstance(reply, Exception):
            # What queued meanwhile fails too: sent now, it would only wait
            # again on a Redis that has just failed.
            failed, self._pending = [*batch, *self._pending], []
            for check in failed:
                if not check.answer.done():  # else its caller has gone (the client disconnected)
                    check.answer.set_exception(RateLimiterUnavailable(str(reply)))
            self.outage.failed(reply, unchecked=len(failed))
        else:
            self.outage.answered()
            # The first count each counter drew, and the last.
            totals = [int(total) for total in reply]
            firsts = {key: total - draws[key] + 1 for key, total in zip(draws, totals, strict=True)}
            for check in batch:
                for i, key in enumerate(check.keys):
                    if check.counts[i] == 0:
                        check.counts[i] = firsts[key]
                        firsts[key] += 1
                self._answer(check)
            for key, total in zip(draws, totals, strict=True):
                self._leases.keep(key, ends[key], kept, firsts[key], total, caps[key])
            # Checks that queued meanwhile may find their counts in what was just drawn.
            waiting, self._pending = self._pending, []
            for check in waiting:
                for i, (key, cap) in enumerate(zip(check.keys, check.caps, strict=True)):
                    if check.counts[i] == 0:
                        check.counts[i] = self._leases.take(key, cap)
                if 0 in check.counts:
                    self._pending.append(check)
                else:
                    self._answer(check)
        if self._pending:
            self._send()  # what still waits goes at once

    def _answer(self, check: _Check) -> None:
        if not check.answer.done():  # else its caller has gone (the client disconnected)
            check.answer.set_result(_judge(check.caps, check.counts, check.window_end, self._clock()))
