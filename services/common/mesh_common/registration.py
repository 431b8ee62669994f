"""Self-registration in Consul (through the app's client, consul.py), with two HTTP checks.

Two checks, because Consul's reaper (``DeregisterCriticalServiceAfter``)
must only ever see the process itself:

- **live** (``/health/live``): the process answers. Critical for a minute,
  the instance is dead or hung, and Consul removes it.
- **ready** (``/health``): its dependencies answer too. Critical, the instance
  leaves every healthy set, and comes back when they do: a database outage
  of any length must not remove instances that are fine.

And a keeper (keeper.py), because a registration can still be lost while
the process lives (a Consul agent restarted with its state in memory, as
``-dev`` keeps it): it holds a blocking query on the instance's entry at
the agent, and registers it again the moment the agent no longer knows
it, with the checks as the instance knows them (``health.readiness``),
not critical as Consul would start them.

At start, an agent that is away or failing (a 5xx) is waited for, up to
``REGISTER_WAIT``; one that refuses (a 4xx) fails the start at once. A
registration sent may have reached the agent whatever its answer, so a
failed start deregisters too. At stop, every deregistration shares one
``CALL_TIMEOUT``: an agent that hangs costs the stop no more than that.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import aiohttp
import consul
import consul.aio
import structlog
from aiohttp import web
from yarl import URL

from .app import CleanupCtx
from .consul import CONSUL
from .health import SERVICE, readiness
from .keeper import KEEP_WAIT, keep
from .keeper import refused as _refused
from .settings import ServiceSettings

# Whether the instance is ready now; None while it may not listen yet.
Readiness = Callable[[], Awaitable[bool | None]]
log = structlog.get_logger()
# Consul waits this long for a check's answer; /health gives its own
# dependency checks less (health.CHECK_TIMEOUT), so that a slow one is
# reported by name in a 503 rather than as a bare timeout.
CHECK_HTTP_TIMEOUT = "2s"
# A registration or deregistration that Consul does not answer must not
# hold up a start or outlast a container's stop grace period.
CALL_TIMEOUT = 5.0
# An agent away at start (not up yet beside us under compose, restarting,
# electing a leader) is waited for this long, with waits of up to 0.25 s,
# doubling to CALL_TIMEOUT, with full jitter. Then the start fails, and
# compose's restart policy starts it again. The first wait is also the
# least time left worth another attempt.
REGISTER_WAIT = 30.0
REGISTER_FIRST_WAIT = 0.25


class Registration:
    """This instance's entry in Consul's catalog, with its health check."""

    def __init__(
        self,
        client: consul.aio.Consul,
        service: ServiceSettings,
        tags: list[str] | None = None,
        *,
        readiness: Readiness | None = None,
    ) -> None:
        self._client = client
        self._service = service
        self._tags = tags or []
        self._readiness = readiness
        # True from the moment a registration is sent: an answer lost on its
        # way back (a timeout) may leave an entry, which only a deregistration
        # is sure to remove. Consul forgetting an unknown id is no harm.
        self.registered = False
        self._keeper: asyncio.Task[None] | None = None
        self._leave_by: float | None = None

    @property
    def service_id(self) -> str:
        return self._service.instance_id

    async def register(self, *, within: float = REGISTER_WAIT) -> None:
        """Register, waiting up to ``within`` seconds for an agent that is away or failing.

        An agent that refuses (a 4xx: a token it denies, a definition it
        rejects) fails the start at once: it would answer the same again.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        until = started + within
        step = REGISTER_FIRST_WAIT
        # A loop, not backoff's decorator: that cuts its last wait to the
        # budget, and then tries once more with no time left to answer.
        for attempt in itertools.count(1):
            try:
                await self._register_once(until)
                break
            except Exception as exc:
                wait = random.uniform(0, step)  # full jitter: instances restarted together spread out
                away = isinstance(exc, (aiohttp.ClientError, OSError, TimeoutError, consul.ConsulException))
                if not away or _refused(exc) or until - loop.time() - wait < REGISTER_FIRST_WAIT:
                    log.error(
                        "consul_register_failed",
                        service_id=self.service_id,
                        consul=self._client.http.base_uri,
                        error=_reason(exc),
                        refused=_refused(exc),  # else unreachable or failing all that time
                        attempts=attempt,
                        seconds=round(loop.time() - started, 1),
                    )
                    raise
                log.warning(
                    "consul_register_retrying",
                    service_id=self.service_id,
                    consul=self._client.http.base_uri,
                    error=_reason(exc),
                    attempt=attempt,
                    wait=round(wait, 2),
                )
                await asyncio.sleep(wait)
                step = min(2 * step, CALL_TIMEOUT)
        s = self._service
        log.info("consul_registered", service_id=self.service_id, address=s.advertise_address, port=s.port)

    async def _register_once(self, until: float | None = None) -> None:
        s = self._service
        base = URL.build(scheme="http", host=s.advertise_address, port=s.port)  # [brackets] for IPv6
        # For this instance only: another at its address answers 404 (health.py).
        mine = {"instance": self.service_id}
        live = consul.Check.http(
            str((base / "health/live").with_query(mine)),
            interval=s.check_interval,
            timeout=CHECK_HTTP_TIMEOUT,
            deregister=s.deregister_after,
        )
        ready = consul.Check.http(
            str((base / "health").with_query(mine)), interval=s.check_interval, timeout=CHECK_HTTP_TIMEOUT
        )
        # Consul starts a check critical and first calls it up to an interval
        # later: an instance registered again while it serves would be out of
        # every healthy set (and Consul's DNS) that long. One starting stays
        # critical: it listens only once its start-up, this included, is over.
        ready_now = await self._readiness() if self._readiness is not None else None
        if ready_now is not None:
            live["Status"] = "passing"
            ready["Status"] = "passing" if ready_now else "critical"
        was, self.registered = self.registered, True
        self._leave_by = None  # a deregistration after this one has its own budget
        deadline = asyncio.get_running_loop().time() + CALL_TIMEOUT
        try:
            async with asyncio.timeout_at(deadline if until is None else min(deadline, until)):
                await self._client.agent.service.register(
                    s.name,
                    service_id=self.service_id,
                    address=s.advertise_address,
                    port=s.port,
                    tags=self._tags,
                    meta={"version": s.version},
                    check={**live, "Name": "live: the process answers"},
                    extra_checks=[{**ready, "Name": "ready: its dependencies answer"}],
                )
        except Exception as exc:
            if _refused(exc) or isinstance(exc, aiohttp.ClientConnectorError):
                self.registered = was  # Consul said no, or never heard: this try left nothing
            raise

    def start_keeping(self, wait: float = KEEP_WAIT) -> None:
        """Keep the instance registered in the background (keeper.py) until ``deregister`` or ``disown``."""
        self._keeper = asyncio.create_task(
            keep(
                self._client,
                self.service_id,
                register=self._register_once,
                registered=lambda: self.registered,
                call_timeout=CALL_TIMEOUT,
                wait=wait,
            ),
            name="consul-keep",
        )

    async def disown(self) -> None:
        """Leave the entry to the process that listens on our address and port: its id is ours too.

        For a start that fails at its listen. That process registered under
        this same id (an instance's id is its address and port), and a
        deregistration would take it out of Consul until its keeper noticed.
        If it is no instance of ours, its checks fail ours (they name the
        instance), and Consul reaps the entry after ``deregister_after``.
        """
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
            self._keeper = None
        self.registered = False
        log.warning("consul_entry_left_to_the_listener", service_id=self.service_id)

    async def deregister(self) -> None:
        # Idempotent: the shutdown path calls it before draining, and the
        # cleanup context calls it again, in case shutdown went another way
        # or the first try failed (the agent busy or briefly away). Every
        # call shares one CALL_TIMEOUT from the first: an agent that hangs
        # costs a stop 5 s, not 5 s a call, inside compose's grace period.
        if not self.registered:
            return
        loop = asyncio.get_running_loop()
        if self._leave_by is None:
            self._leave_by = loop.time() + CALL_TIMEOUT
        leave_by = self._leave_by
        if loop.time() >= leave_by:
            log.warning("consul_deregister_skipped", service_id=self.service_id, why="its time is spent")
            return
        if self._keeper is not None:
            # Stopped first, and waited for: a registration it was sending
            # must not reach Consul after the deregistration does.
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
            self._keeper = None
        try:
            async with asyncio.timeout_at(leave_by):
                await self._client.agent.service.deregister(self.service_id)
        except consul.NotFound:
            pass  # the agent has already forgotten us (a restart): that is the goal
        except Exception as exc:  # still registered: the next call tries again, else Consul's reaper
            log.warning("consul_deregister_failed", service_id=self.service_id, error=type(exc).__name__)
            return
        self.registered = False
        log.info("consul_deregistered", service_id=self.service_id)


def _reason(exc: BaseException) -> str:
    # Consul's own words where it answered (a 403's "Permission denied"), cut short.
    text = str(exc)[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


REGISTRATION = web.AppKey("mesh.registration", Registration)


def registration_ctx(tags: list[str] | None = None, *, wait_for_consul: float = REGISTER_WAIT) -> CleanupCtx:
    """A cleanup context that registers the instance: add it **last**.

    ``wait_for_consul`` (seconds) is how long the start waits for an agent
    that is away or failing before it gives up.

    Registering last means every dependency is ready before traffic arrives;
    cleanup runs in reverse, so the instance leaves Consul before anything
    it needs is closed.
    """

    @asynccontextmanager
    async def register_in_consul(app: web.Application) -> AsyncIterator[None]:
        registration = Registration(app[CONSUL], app[SERVICE], tags, readiness=partial(readiness, app))
        app[REGISTRATION] = registration
        try:
            # In the try: a start that fails here may have left an entry.
            await registration.register(within=wait_for_consul)
            registration.start_keeping()
            yield
        finally:
            await registration.deregister()

    return register_in_consul
