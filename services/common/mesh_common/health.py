"""``/health``: readiness with its dependencies, and ``/health/live``.

Consul calls both (see consul.py). ``/health`` fails when a required
dependency does, so an instance whose database is gone leaves every healthy
set until it is back. A dependency that only some requests need (Redis for
the user-service's login throttle, a broker that an outbox waits for) is
reported but not required: every instance shares it, so failing on it would
take all of them out at once, and the requests that do not need it with
them. Its state still shows in the check's output, in Consul's UI.

``/health/live`` only says the process answers: what Consul's reaper, and an
orchestrator that restarts what hangs, go by.

Consul's checks name the instance they are for (``?instance=<id>``), and
another instance answers them 404. A killed instance stays registered until
Consul reaps it, and if another service took its address and port meanwhile
(compose gives every service but the gateway port 8080), that one's answer would otherwise
keep the dead entry passing, and its traffic going to the wrong service.

``readiness`` is what the instance tells Consul when it registers again
while it serves (consul.py): Consul would start both checks critical.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from .problems import NotFound
from .settings import ServiceSettings

Check = Callable[[], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class HealthCheck:
    run: Check
    required: bool = True


@dataclass(slots=True)
class Answered:
    """When the instance last answered a check (monotonic): then it listened, which it does only after its start-up."""

    at: float | None = None

    def lately(self) -> bool:
        return self.at is not None and time.monotonic() - self.at < ANSWERED_LATELY


SERVICE = web.AppKey("mesh.service", ServiceSettings)
HEALTH_CHECKS = web.AppKey("mesh.health_checks", dict[str, HealthCheck])
ANSWERED = web.AppKey("mesh.health_answered", Answered)
CHECK_TIMEOUT = 1.5  # below Consul's check timeout (consul.CHECK_HTTP_TIMEOUT)
# A check answered within this long says the instance listens now: longer
# than an agent's restart, shorter than the minute of failed live checks
# after which Consul reaps an instance that still runs but no longer answers.
# Checks are called at least three times as often (settings.CHECK_INTERVAL_MAX).
ANSWERED_LATELY = 30.0


def add_health_check(app: web.Application, name: str, check: Check, *, required: bool = True) -> None:
    app[HEALTH_CHECKS][name] = HealthCheck(check, required)


async def _run(check: Check) -> str:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            await check()
    except Exception as exc:  # a failed dependency is a report, not an error
        return f"failing: {type(exc).__name__}"
    return "ok"


def _take_check(request: web.Request) -> None:
    """Refuse a check for another instance; note when Consul's check for this one was answered.

    Only Consul's checks count, which name the instance: a probe on the
    loopback (Docker's HEALTHCHECK, every 10 s) says nothing of whether Consul
    reaches it, and counted, it vouched for an instance Consul had just
    reaped for failing its checks.
    """
    asked = request.query.get("instance")
    if asked is None:
        return
    if asked != request.app[SERVICE].instance_id:
        raise NotFound("This check is for another instance")
    request.app[ANSWERED].at = time.monotonic()


async def readiness(app: web.Application) -> bool | None:
    """Whether the instance is ready, by its required checks run now; None while it may not listen yet.

    Until it has answered one of Consul's checks lately it may still be
    starting (``serve`` listens only once the start-up, its registration
    included, is over), or Consul may not reach it.
    """
    if not app[ANSWERED].lately():
        return None
    required = [check.run for check in app[HEALTH_CHECKS].values() if check.required]
    return all(result == "ok" for result in await asyncio.gather(*map(_run, required)))


async def health(request: web.Request) -> web.Response:
    _take_check(request)
    service = request.app[SERVICE]
    checks = request.app[HEALTH_CHECKS]
    results = dict(zip(checks, await asyncio.gather(*(_run(c.run) for c in checks.values())), strict=True))
    ready = all(results[name] == "ok" for name, check in checks.items() if check.required)
    if not ready:
        status = "unavailable"
    elif all(result == "ok" for result in results.values()):
        status = "ok"
    else:
        status = "degraded"  # in service; some requests may fail on what is missing
    body = {
        "status": status,
        "service": service.name,
        "version": service.version,
        "instance": service.instance_id,
        "checks": results,
    }
    return web.json_response(body, status=200 if ready else 503)


async def live(request: web.Request) -> web.Response:
    _take_check(request)
    service = request.app[SERVICE]
    return web.json_response({"status": "ok", "service": service.name, "version": service.version})


def setup_health(app: web.Application, service: ServiceSettings) -> None:
    app[SERVICE] = service
    app[HEALTH_CHECKS] = {}
    app[ANSWERED] = Answered()
    app.router.add_get("/health", health, name="health")
    app.router.add_get("/health/live", live, name="health.live")
