"""Healthy instances of a service, kept in memory by a Consul blocking query.

One watch per upstream service long-polls ``/v1/health/service/<name>?passing``
with ``index`` and ``wait``. Consul answers as soon as the healthy set
changes, so a request never waits for Consul: it reads ``instances``. When
Consul is unreachable, or sends an answer that cannot be read, the last
known set is kept and the watch retries with backoff. An index that does not
move would make every query return at once, so such polls are spaced by
``MIN_POLL_GAP``.

An agent back after a failure may have restarted with its state in memory
(``-dev``): it answers an empty set until the instances' keepers have
registered them again, a few hundred milliseconds. For ``REJOIN_GRACE``
after its return, an empty answer does not replace a set that was not
empty: believed, it made every route a 503 meanwhile.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import consul.aio
import structlog
from aiohttp import web
from yarl import URL

from .app import CleanupCtx, wait_event
from .consul import CONSUL

log = structlog.get_logger()
# The least time between the starts of two polls whose index did not move
# (0, unchanged or gone backwards): a blocking query returns at once then.
MIN_POLL_GAP = 0.1
# How much longer than its wait a blocking query may take before it is given
# up for stuck (a frozen agent, a half-open connection). Consul adds up to a
# sixteenth of the wait as jitter; the rest is the round trip's slack.
# Without it the HTTP client's own default (300 s) froze the set that long.
STALL_SLACK = 5.0
# How long after Consul's return from a failure an empty answer is not taken
# for the truth: several times the keepers' quarter-second poll
# (registration.py), so that every instance is registered again by then. A
# service that is really gone is still chosen that long; its breakers and
# the retries take its failures meanwhile.
REJOIN_GRACE = 2.0


@dataclass(frozen=True, slots=True)
class Instance:
    id: str
    address: str
    port: int
    # Built once: it is read on every proxied request.
    base_url: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # yarl puts an IPv6 address in brackets.
        object.__setattr__(self, "base_url", str(URL.build(scheme="http", host=self.address, port=self.port)))


class NoInstances(LookupError):
    """No healthy instance of a service is known."""


class ServiceWatch:
    def __init__(self, client: consul.aio.Consul, service: str, *, wait: float = 30.0) -> None:
        self.service = service
        self.instances: tuple[Instance, ...] = ()
        self.index: str | None = None
        self._client = client
        self._wait = wait
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Queries failed in a row, and when (loop time) Consul last answered
        # one: what /ready shows, as the set alone cannot say it is stale.
        self.failures = 0
        self.answered_at: float | None = None
        # Until when (loop time) an empty answer is not believed: Consul is back from a failure.
        self._rejoin_until: float | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"consul-watch-{self.service}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def wait_ready(self, seconds: float) -> bool:
        """Wait for the first answer from Consul, for at most ``seconds``."""
        return await wait_event(self._ready, seconds)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = 0.1
        while True:
            started = loop.time()
            sent = self.index
            wait = self._wait
            if self._rejoin_until is not None:
                # Held no longer than the grace: then its answer, empty or not, is the truth.
                wait = min(wait, max(MIN_POLL_GAP, self._rejoin_until - started))
            try:
                async with asyncio.timeout(wait * 17 / 16 + STALL_SLACK):
                    index, entries = await self._client.health.service(
                        self.service, passing=True, index=sent, wait=f"{wait:g}s"
                    )
                self.answered_at = loop.time()
                if self.failures:
                    self.failures = 0
                    self._rejoin_until = self.answered_at + REJOIN_GRACE
                # Else the wait timed out with no change.
                if index != sent or not self._ready.is_set() or self._rejoin_until is not None:
                    self._update(index, entries, self.answered_at)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Keep serving from the last known set; Consul may be restarting,
                # or have sent an answer we cannot read. The next query does not
                # block: a restarted Consul counts its index from 1 again, and
                # would hold a query for our old, higher index for a whole wait.
                self.index = None
                self.failures += 1
                log.warning(
                    "consul_watch_failed",
                    service=self.service,
                    error=type(exc).__name__,
                    known=len(self.instances),
                    retry_in=round(delay, 2),
                )
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.1
            if not _moved_on(sent, index):
                # Consul answers an index it has not passed at once, and would
                # again: without a gap the watch would spin. (After a full
                # wait with no change, the gap has long passed.)
                await asyncio.sleep(max(0.0, started + MIN_POLL_GAP - loop.time()))

    def _update(self, index: str, entries: list[dict[str, Any]], now: float) -> None:
        found = []
        for e in entries:
            address = e["Service"]["Address"] or e["Node"]["Address"]
            try:
                found.append(Instance(id=e["Service"]["ID"], address=address, port=e["Service"]["Port"]))
            except ValueError:
                # Consul takes any string as an address; one that is no host
                # must not stop the rest of the set from being seen.
                log.warning("consul_instance_skipped", service=self.service, address=address)
        instances = tuple(sorted(found, key=lambda i: i.id))
        if index is not None and int(index) < 1:
            # A Consul bug by its own docs, and index=0 never blocks: ask
            # from 1 instead, as Consul's blocking-query guidance says.
            index = "1"
        elif self.index is not None and index is not None and int(index) < int(self.index):
            # Consul may reset the index (a restart); start over rather than block forever.
            index = "0"
        self.index = index
        if self._rejoin_until is not None:
            if not instances and self.instances and now < self._rejoin_until:
                log.info("instances_kept_while_consul_rejoins", service=self.service, known=len(self.instances))
                return
            self._rejoin_until = None
        if instances != self.instances:
            log.info("instances_changed", service=self.service, instances=[i.id for i in instances])
        self.instances = instances
        self._ready.set()


def _moved_on(sent: str | None, received: str | None) -> bool:
    """Whether Consul's index went forward: only then does the next query block."""
    if received is None:
        return False
    try:
        return int(received) > int(sent or 0)
    except ValueError:
        return False


WATCHES = web.AppKey("mesh.watches", dict[str, ServiceWatch])


def watch_services_ctx(*services: str) -> CleanupCtx:
    """A cleanup context that keeps one watch per upstream service."""

    @asynccontextmanager
    async def watch_services(app: web.Application) -> AsyncIterator[None]:
        watches = {name: ServiceWatch(app[CONSUL], name) for name in services}
        app[WATCHES] = watches
        for watch in watches.values():
            watch.start()
        try:
            yield
        finally:
            await asyncio.gather(*(w.stop() for w in watches.values()))

    return watch_services
