"""What the rate limiter remembers of its Redis being down, so no request waits to find out again.

Without it, every check that needed a draw went to Redis anyway: against a
Redis that accepts connections and never answers (a stopped process, a
paused container, a balancer in front of a dead one), each waited out the
deadline, connecting afresh, and each read let through logged a line of its
own. Once a call fails, checks fail at once instead, while one probe at a
time (a draw of nothing, which no request waits for) tells when Redis is
back: the first straight away, since a dropped connection mostly heals by
connecting again, then after 1 s, doubling up to 5 s.

What is let through meanwhile (reads, and the writes that keep a session
going) is still bounded per client, by the gateway alone: a token bucket
per client IP (``Buckets``), so that no one client floods the services
behind while nothing shared counts it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from .redis_script import OnReply, Reply

FIRST_WAIT = 1.0  # between the failed probes of one outage, at first
LONGEST_WAIT = 5.0  # and at most, however long it lasts
# Clients with a bucket, per table; past that, the one seen longest ago goes.
# A bucket idle for a window is full again, the same as none, so this is
# lossless unless a gateway sees more clients than this within one window
# (the figure its leases keep, too); a client evicted early only gets its
# burst back early. About 250 bytes a bucket: 12 MB for a full table.
BUCKETS_KEPT = 50_000

log = structlog.get_logger()


class RateLimiterUnavailable(Exception):
    """Redis did not answer; the caller decides whether to fail open."""


@dataclass(frozen=True, slots=True)
class Allowance:
    """A token bucket's shape: ``burst`` requests at once, then ``per_second``."""

    burst: int
    per_second: float


# Of a client IP's limit, the share its session writes may take while Redis
# is away (see session_allowance).
SESSION_SHARE = 10


def session_allowance(per_ip: int, window_seconds: int) -> Allowance:
    """What refreshes and logouts from one IP get through a gateway while Redis is away.

    Counted against the IP's limit alone when Redis is there (they are not
    logins), but a tighter share of it meanwhile: a junk refresh token costs
    the user-service a transaction, and only it can tell one from a real
    token. A tenth: by default 600 at once and 10 a second, which some 6,000
    users behind one NAT, each refreshing every 10 minutes, stay below; the
    auth routes' 30 a minute would have signed out all but a few dozen.
    """
    share = max(1, per_ip // SESSION_SHARE)
    return Allowance(share, share / window_seconds)


class Buckets:
    """One token bucket per client, in this process only, the least recently seen evicted past ``kept``."""

    def __init__(self, allowance: Allowance, *, kept: int = BUCKETS_KEPT, clock: Callable[[], float] = time.monotonic):
        self.allowance = allowance
        self._kept = kept
        self._clock = clock
        self._table: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, as of when (clock)

    def __len__(self) -> int:
        return len(self._table)

    def wait(self, client: str) -> float:
        """The seconds until ``client`` has a token, 0 if it has one now; nothing taken."""
        tokens, _ = self._tokens(client)
        return 0.0 if tokens >= 1 else (1 - tokens) / self.allowance.per_second

    def take(self, client: str) -> float:
        """Take a token for ``client``: 0 if there was one, else the seconds until there is.

        A refusal takes nothing: a client sending faster than the refill
        gets exactly the refill through, however hard it hammers.
        """
        per_second = self.allowance.per_second
        tokens, now = self._tokens(client)
        if tokens >= 1:
            tokens, wait = tokens - 1, 0.0
        else:
            wait = (1 - tokens) / per_second
        self._table[client] = (tokens, now)
        self._table.move_to_end(client)
        if len(self._table) > self._kept:
            self._table.popitem(last=False)
        return wait

    def _tokens(self, client: str) -> tuple[float, float]:
        """``client``'s tokens now, refilled since it was last seen, and now."""
        burst, now = self.allowance.burst, self._clock()
        tokens, then = self._table.get(client, (burst, now))
        return min(burst, tokens + (now - then) * self.allowance.per_second), now


class Outage:
    """Whether Redis is down, when to probe it next, and what went unchecked meanwhile.

    Logged when it goes and when it comes back (at the same level, so the
    pair is seen together), never per request.
    """

    def __init__(self, probe: Callable[[OnReply], None]) -> None:
        self._probe = probe  # sends a call that counts nothing; its answer goes to the callback it is given
        self._since: float | None = None  # monotonic; None while Redis answers
        self._next_probe = 0.0
        self._wait = FIRST_WAIT
        self._probing = False
        self._closed = False
        self._error = ""  # what the last failed call said
        self._unchecked = 0  # checks answered without Redis this outage
        self._passed = 0  # of which let through anyway
        self._refused = 0  # and refused, past a client's in-process allowance

    @property
    def down(self) -> bool:
        return self._since is not None

    def close(self) -> None:
        self._closed = True  # what closing fails is no outage

    def unavailable(self) -> RateLimiterUnavailable:
        """The answer to a check while Redis is down; it sends the probe, when one is due."""
        self._unchecked += 1
        if not self._probing and time.monotonic() >= self._next_probe:
            self._probing = True
            try:
                self._probe(self._probed)
            except Exception as exc:  # nothing went out; left probing, no probe would go again
                self._probed(exc)
        return RateLimiterUnavailable(self._error)

    def failed(self, error: Exception, *, unchecked: int) -> None:
        """A batch of ``unchecked`` checks failed."""
        self._unchecked += unchecked
        self._probed(error)

    def answered(self) -> None:
        """A batch was answered: Redis is there."""
        self._probed([])

    def passed_unchecked(self) -> bool:
        """Count a request let through without a check; True for the first of the outage, the one to log."""
        self._passed += 1
        return self._passed == 1

    def refused_unchecked(self, ip: str) -> None:
        """Count a request from ``ip`` refused past its client's allowance; the first of the outage is logged."""
        self._refused += 1
        if self._refused == 1:
            log.warning("rate_limiter_unavailable_refusing", ip=ip)

    def _probed(self, reply: Reply) -> None:
        self._probing = False
        now = time.monotonic()
        if not isinstance(reply, Exception):
            if self._since is not None:
                down_s, unchecked = round(now - self._since, 1), self._unchecked
                passed, refused = self._passed, self._refused
                log.warning(
                    "rate_limiter_back", down_s=down_s, unchecked=unchecked, failed_open=passed, refused=refused
                )
            self._since, self._wait, self._unchecked, self._passed, self._refused = None, FIRST_WAIT, 0, 0, 0
            return
        if self._closed:
            return
        self._error = str(reply)
        if self._since is None:
            self._since = self._next_probe = now  # the first probe may go at once
            log.warning("rate_limiter_down", error=self._error)
        else:
            self._next_probe = now + self._wait
            self._wait = min(2 * self._wait, LONGEST_WAIT)
