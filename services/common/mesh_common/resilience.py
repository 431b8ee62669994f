"""Passive health for calls to other instances, and a budget for their retries.

One circuit breaker per upstream *instance*, held in app state. circuitbreaker
keeps the count and the open/half-open clock; each call goes through its own
context, ``BreakerBoard.breaker(id)``, which decides what the call proves:

* ``UpstreamFailure`` (refused, timed out, 5xx) counts. A 4xx is the caller's
  problem: callers do not raise it as one, so it never opens a breaker.
* A success closes the breaker, and ends a run of failures, only when the
  breaker is closed or the call was the half-open probe: a call that began
  before the breaker opened says nothing about the instance now.
* Any other exception (our client went away, a cancellation) says nothing
  about the instance: it neither counts nor resets.
* Once open for ``recovery_timeout``, a breaker half-opens and ``pick`` lets
  ONE call through as a probe; it skips the instance while the probe is in
  flight, so that a sick instance never gets every concurrent request. A
  caller that streams the answer ends the probe with ``settle()`` once the
  head has come back well: a long download must not keep every other
  request away from a recovered instance. A failure later in the stream
  still counts, against the breaker now closed.

Retries are limited by a budget, so that an outage does not multiply the
load on what is left.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from types import TracebackType
from typing import Protocol

from circuitbreaker import CircuitBreaker

from .discovery import Instance, NoInstances, ServiceWatch

# circuitbreaker's names for its states.
_CLOSED, _HALF_OPEN = "closed", "half_open"


class UpstreamFailure(Exception):
    """The upstream did not give a usable answer: refused, timed out, or 5xx."""


class _Breaker(Protocol):
    """What the board uses of circuitbreaker's ``CircuitBreaker``, which has no type hints."""

    @property
    def state(self) -> str: ...
    @property
    def failure_count(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    @property
    def opened(self) -> bool: ...
    @property
    def open_remaining(self) -> int: ...
    def reset(self) -> None: ...
    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool: ...


class _Call:
    """One call through one instance's breaker (the rules are in the module docstring)."""

    __slots__ = ("_breaker", "_in_flight", "_instance_id", "_probe", "_probing")

    def __init__(self, breaker: _Breaker, instance_id: str, probing: set[str], in_flight: dict[str, int]) -> None:
        self._breaker = breaker
        self._instance_id = instance_id
        self._probing = probing
        self._in_flight = in_flight
        self._probe = False

    def __enter__(self) -> _Call:
        self._in_flight[self._instance_id] = self._in_flight.get(self._instance_id, 0) + 1
        if self._instance_id not in self._probing and self._breaker.state == _HALF_OPEN:
            self._probing.add(self._instance_id)
            self._probe = True
        return self

    def settle(self) -> None:
        """The call has shown the instance answers: a probe ends here, whatever follows."""
        if self._probe:
            self._probe = False
            self._probing.discard(self._instance_id)
            if self._breaker.state == _HALF_OPEN:
                self._breaker.reset()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        breaker = self._breaker
        try:
            if exc_type is None:
                # A probe closes the breaker only if no other failure opened it
                # again meanwhile; circuitbreaker's own __exit__ would always reset.
                if breaker.closed or (self._probe and breaker.state == _HALF_OPEN):
                    breaker.reset()
            elif issubclass(exc_type, UpstreamFailure):
                # circuitbreaker counts a failure only through its __exit__.
                breaker.__exit__(exc_type, exc, tb)
        finally:
            if self._probe:
                self._probing.discard(self._instance_id)
            left = self._in_flight.pop(self._instance_id) - 1
            if left:
                self._in_flight[self._instance_id] = left


class _NoBreaker:
    """A call with breakers switched off (the benchmarks' pass-through gateway)."""

    def __enter__(self) -> _NoBreaker:
        return self

    def __exit__(self, *_: object) -> None:
        return None

    def settle(self) -> None:
        return None


class BreakerBoard:
    # Instances come and go (each scale-up or restart is a new ID), so once
    # the board holds this many breakers it forgets the ones that hold no
    # state, and the ones not called for FORGET_AFTER seconds: an instance
    # that failed and then left Consul would otherwise be kept for ever.
    PRUNE_AT = 256
    FORGET_AFTER = 600.0

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        recovery_timeout: float = 5.0,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # circuitbreaker reads 0 as "its own default" (5 failures, 30 s).
        if failure_threshold < 1 or recovery_timeout <= 0:
            raise ValueError("a breaker needs at least 1 failure to open and a recovery time above 0")
        self._threshold = failure_threshold
        self._recovery = recovery_timeout
        self._enabled = enabled
        self._clock = clock
        self._breakers: dict[str, _Breaker] = {}
        self._last_used: dict[str, float] = {}
        # Calls under way per instance: their breaker is never forgotten, or
        # their outcome would land on an object nobody looks at any more.
        self._in_flight: dict[str, int] = {}
        self._prune_at = self.PRUNE_AT
        # Half-open instances whose one probe is in flight.
        self._probing: set[str] = set()

    def breaker(self, instance_id: str) -> _Call | _NoBreaker:
        """A context for one call to ``instance_id``: enter it just before the call."""
        if not self._enabled:
            return _NoBreaker()
        breaker = self._breakers.get(instance_id)
        if breaker is None:
            if len(self._breakers) >= self._prune_at:
                self._prune()
            breaker = CircuitBreaker(
                failure_threshold=self._threshold,
                recovery_timeout=self._recovery,
                expected_exception=UpstreamFailure,
                name=instance_id,
            )
            self._breakers[instance_id] = breaker
        self._last_used[instance_id] = self._clock()
        return _Call(breaker, instance_id, self._probing, self._in_flight)

    @property
    def size(self) -> int:
        """How many breakers the board holds (not ``__len__``: an empty board is still a board)."""
        return len(self._breakers)

    def _prune(self) -> None:
        # A closed breaker with no failures is what a new one would be.
        idle_since = self._clock() - self.FORGET_AFTER
        self._breakers = {
            instance_id: breaker
            for instance_id, breaker in self._breakers.items()
            if instance_id in self._in_flight
            or ((breaker.failure_count or not breaker.closed) and self._last_used[instance_id] > idle_since)
        }
        self._last_used = {instance_id: self._last_used[instance_id] for instance_id in self._breakers}
        # Amortised: when most breakers still matter, the next pass waits
        # until the board has doubled, instead of coming with every new one.
        self._prune_at = max(self.PRUNE_AT, 2 * len(self._breakers))

    def is_open(self, instance_id: str) -> bool:
        breaker = self._breakers.get(instance_id)
        return breaker is not None and breaker.opened

    def available(self, instance_id: str) -> bool:
        """Whether a call may go to ``instance_id``: closed, or half-open with no probe in flight."""
        breaker = self._breakers.get(instance_id)
        if breaker is None:
            return True
        state = breaker.state
        return state == _CLOSED or (state == _HALF_OPEN and instance_id not in self._probing)

    def failures(self, instance_id: str) -> int:
        breaker = self._breakers.get(instance_id)
        return breaker.failure_count if breaker is not None else 0

    def has_candidate(self, watch: ServiceWatch, exclude: set[str] | frozenset[str]) -> bool:
        """Whether ``pick`` would find an instance outside ``exclude``: is a retry worth it."""
        return any(i.id not in exclude and self.available(i.id) for i in watch.instances)

    def pick(self, watch: ServiceWatch, exclude: frozenset[str] = frozenset()) -> Instance:
        """A random healthy instance whose breaker lets calls through.

        Raises ``NoInstances`` when Consul knows none, and ``AllBreakersOpen``
        when every known one is open or half-open with its probe in flight.
        """
        # One pass, no sets: this runs on every proxied request.
        candidates = [i for i in watch.instances if i.id not in exclude and self.available(i.id)]
        if candidates:
            return random.choice(candidates)
        if any(i.id not in exclude for i in watch.instances):
            raise AllBreakersOpen(watch.service)
        raise NoInstances(watch.service)

    def state(self, instance_id: str) -> str:
        breaker = self._breakers.get(instance_id)
        return breaker.state if breaker is not None else "closed"

    def retry_after(self, watch: ServiceWatch) -> int:
        """Seconds until the first open breaker of ``watch`` half-opens (1 while a probe is out)."""
        waits = [self._breakers[i.id].open_remaining for i in watch.instances if not self.available(i.id)]
        return max(1, min(waits, default=1))


class AllBreakersOpen(NoInstances):
    """Every healthy instance has an open breaker."""


class RetryBudget:
    """At most ``ratio`` extra attempts per request, over a sliding window.

    Up to ``minimum`` retries per window are allowed whatever the traffic,
    so that a quiet service can still retry its first failures.
    """

    def __init__(self, *, ratio: float = 0.2, minimum: int = 3, window: float = 10.0) -> None:
        self._ratio = ratio
        self._minimum = minimum
        self._window = window
        self._started = time.monotonic()
        self._requests = 0
        self._retries = 0
        self._previous = (0, 0)

    def _roll(self) -> None:
        now = time.monotonic()
        if now - self._started >= self._window:
            self._previous = (self._requests, self._retries) if now - self._started < 2 * self._window else (0, 0)
            self._requests = self._retries = 0
            self._started = now

    def record_request(self) -> None:
        self._roll()
        self._requests += 1

    def try_spend(self) -> bool:
        self._roll()
        requests = self._requests + self._previous[0]
        retries = self._retries + self._previous[1]
        if retries >= max(self._minimum, self._ratio * requests):
            return False
        self._retries += 1
        return True
