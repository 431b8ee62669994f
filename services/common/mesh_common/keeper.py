"""The keeper: registers the instance again as soon as its Consul agent has lost it.

A registration can be lost while the process lives: a Consul agent
restarted with its state in memory (as ``-dev`` keeps it) has forgotten
every instance, and until each has registered again every watch sees it
gone. So the keeper holds a blocking query open on the instance's own
entry at the agent (``GET /v1/agent/service/<id>`` with ``hash`` and
``wait``), and learns of a loss as it happens, not on a round:

- the agent forgets the entry: it answers 404 at once, and the keeper
  registers again;
- the agent stops: it drops the held connection at once, and the keeper
  asks every ``AWAY_INTERVAL`` (with jitter) until it answers, 404 as a
  restarted agent does, and registers again;
- nothing happens: the agent answers after ``KEEP_WAIT`` with the hash it
  was given, and the keeper asks again.

It knows nothing of the checks: ``register`` is the registration's own,
which gives them as the instance knows them.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import consul.aio
import structlog
from consul.base import Response
from consul.callback import CB
from consul.exceptions import ACLDisabled, ACLPermissionDenied, BadRequest, ClientError, NotFound

log = structlog.get_logger()
# How long the agent holds the query open when nothing changes. A loss or
# an agent's stop ends it at once whatever the wait, so a long one costs
# nothing in reaction time; it only bounds how long an agent that hangs
# with the connection open goes unnoticed (nothing the keeper could mend),
# and each wait run out is one request to a local agent. 30 s is far
# below Consul's default (5 min) and any idle timeout between us.
KEEP_WAIT = 30.0
# How often the keeper asks while the agent is away (with jitter): an agent
# back from a restart has the instance again within a fraction of a second.
# Also the least time between two questions, whatever the answers: an agent
# that answers at once (a query it does not hold) is not asked in a loop.
AWAY_INTERVAL = 0.25
# An agent that refuses (a 4xx: a token without service:read) would answer
# the same at once: it is asked again this much later, and logged each time.
REFUSED_INTERVAL = 2.0


async def keep(
    client: consul.aio.Consul,
    service_id: str,
    *,
    register: Callable[[], Awaitable[None]],
    registered: Callable[[], bool],
    call_timeout: float,
    wait: float = KEEP_WAIT,
) -> None:
    """Register again whenever the agent has lost ``service_id``; runs until cancelled.

    ``registered`` says whether the instance means to be in Consul (not
    before its registration, nor once it deregisters); ``call_timeout``
    bounds a question the agent answers at once.
    """
    loop = asyncio.get_running_loop()
    seen: str | None = None  # the entry's content hash as last answered; None: ask without waiting
    away_since: float | None = None  # the agent's first failure in a row, unless it refused
    asked = float("-inf")
    pause = 0.0
    while True:
        soon = random.uniform(0.5, 1.5) * AWAY_INTERVAL  # instances told apart, not in step
        await asyncio.sleep(max(pause, asked + soon - loop.time()))
        asked, pause = loop.time(), 0.0
        if not registered():  # not yet, or no longer: shutting down
            continue
        try:
            # Consul adds up to wait/16 to a wait, so that its answers spread out.
            async with asyncio.timeout(call_timeout + (0 if seen is None else wait * 17 / 16)):
                seen = await _entry(client, service_id, seen, wait)
            if away_since is not None:
                log.info("consul_agent_back", service_id=service_id, away=round(loop.time() - away_since, 2))
                away_since = None
            if seen is None and registered():
                log.warning("consul_registration_lost", service_id=service_id)
                await register()  # one try: the next question is the retry
                log.info("consul_registered", service_id=service_id)
        except Exception as exc:
            is_refused = refused(exc)  # a 4xx: the agent is there, and would answer the same at once
            if away_since is None or is_refused:  # once an outage: its questions come four a second
                log.warning("consul_keep_failed", service_id=service_id, error=type(exc).__name__)
            if is_refused:
                away_since, pause = None, REFUSED_INTERVAL
            elif away_since is None:
                away_since = loop.time()


async def _entry(client: consul.aio.Consul, service_id: str, seen: str | None, wait: float) -> str | None:
    # The entry's content hash once it differs from ``seen`` or the wait has
    # run out, None if the agent does not know the instance. py-consul's
    # agent.service_definition takes no hash or wait and drops the header.
    params = [] if seen is None else [("hash", seen), ("wait", f"{wait:g}s")]
    path = f"/v1/agent/service/{service_id}"
    answer: str | None = await client.http.get(_content_hash, path, params=params, headers=client.prepare_headers())
    return answer


def _content_hash(response: Response) -> str | None:
    if response.code == 404:
        return None  # the agent does not know the instance
    CB.boolean()(response)  # raises py-consul's exception for any other 4xx or 5xx
    # Absent (an agent that does not block), the next question asks at once, a pause later.
    hashed: str | None = response.headers.get("X-Consul-ContentHash")
    return hashed or ""


def refused(exc: BaseException) -> bool:
    """Whether ``exc`` is one of Consul's 4xx answers, which asking again would only repeat.

    The 5xx (a bare ConsulException: no leader yet, an agent restarting)
    and 599 (Timeout) are worth another try.
    """
    return isinstance(exc, (BadRequest, ACLDisabled, ACLPermissionDenied, NotFound, ClientError))
