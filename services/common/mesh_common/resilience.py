"""Passive health and bounded retries for calls to other instances.

One circuit breaker per upstream *instance*, held in app state. Connection
errors, timeouts and 5xx count as failures; a 4xx is the caller's problem and
never opens a breaker. Retries are limited by a budget, so that an outage
does not multiply the load on what is left.
"""

from __future__ import annotations

import random
import time
from contextlib import AbstractContextManager, nullcontext
from types import TracebackType
from typing import Protocol

from circuitbreaker import CircuitBreaker

from .discovery import Instance, NoInstances, ServiceWatch


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
    def __enter__(self) -> None: ...
    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool: ...


class BreakerBoard:
    # Instances come and go (each scale-up or restart is a new ID), so the
    # board forgets breakers that hold no state once it holds this many.
    PRUNE_AT = 256

    def __init__(self, *, failure_threshold: int = 5, recovery_timeout: float = 5.0, enabled: bool = True) -> None:
        self._threshold = failure_threshold
        self._recovery = recovery_timeout
        self._enabled = enabled
        self._breakers: dict[str, _Breaker] = {}

    def breaker(self, instance_id: str) -> AbstractContextManager[object]:
        if not self._enabled:
            return nullcontext()
        breaker = self._breakers.get(instance_id)
        if breaker is None:
            if len(self._breakers) >= self.PRUNE_AT:
                self._prune()
            breaker = CircuitBreaker(
                failure_threshold=self._threshold,
                recovery_timeout=self._recovery,
                expected_exception=UpstreamFailure,
                name=instance_id,
            )
            self._breakers[instance_id] = breaker
        return breaker

    @property
    def size(self) -> int:
        """How many breakers the board holds (not ``__len__``: an empty board is still a board)."""
        return len(self._breakers)

    def _prune(self) -> None:
        # A closed breaker with no failures is what a new one would be; one
        # still in use finishes its call on the old object, harmlessly.
        self._breakers = {
            instance_id: breaker
            for instance_id, breaker in self._breakers.items()
            if breaker.failure_count or not breaker.closed
        }

    def is_open(self, instance_id: str) -> bool:
        breaker = self._breakers.get(instance_id)
        return breaker is not None and breaker.opened

    def pick(self, watch: ServiceWatch, exclude: frozenset[str] = frozenset()) -> Instance:
        """A random healthy instance whose breaker lets calls through.

        Raises ``NoInstances`` when Consul knows none, and ``AllBreakersOpen``
        when every known one is open.
        """
        # One pass, no sets: this runs on every proxied request.
        candidates = [i for i in watch.instances if i.id not in exclude and not self.is_open(i.id)]
        if candidates:
            return random.choice(candidates)
        if any(i.id not in exclude for i in watch.instances):
            raise AllBreakersOpen(watch.service)
        raise NoInstances(watch.service)

    def state(self, instance_id: str) -> str:
        breaker = self._breakers.get(instance_id)
        return breaker.state if breaker is not None else "closed"

    def retry_after(self, watch: ServiceWatch) -> int:
        """Seconds until the first open breaker of ``watch`` half-opens."""
        waits = [self._breakers[i.id].open_remaining for i in watch.instances if self.is_open(i.id)]
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
