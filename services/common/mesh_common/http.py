"""Calls from one service to another: discovered, bounded, and retried if safe.

``ServiceClient.get_json`` resolves the target through its Consul watch,
skips instances whose breaker is open, retries a GET once on another
instance with jittered backoff (when one is left and the retry budget
allows), and never runs past its deadline.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import backoff
from aiohttp import web

from .app import CleanupCtx
from .discovery import WATCHES, NoInstances
from .problems import instance_is_well
from .resilience import BreakerBoard, RetryBudget, UpstreamFailure

HTTP_SESSION = web.AppKey("mesh.http_session", aiohttp.ClientSession)
# The longest a call takes, retry included, unless its caller says otherwise.
CALL_DEADLINE = 2.0
# A retry needs at least this much of the call's deadline left.
MIN_RETRY_SECONDS = 0.1


class UpstreamStatusError(Exception):
    """The upstream answered with a 4xx: the caller's problem, not a failure."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


class _Declined(Exception):
    """A 503 whose code says the instance is well (``problems.instance_is_well``), and declines for now.

    Retried on another instance like a failure, but raised past its breaker
    uncounted (only ``UpstreamFailure`` counts). The gateway's proxy follows
    the same rule.
    """


class ServiceClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        watches: Mapping[str, Any],
        *,
        breakers: BreakerBoard | None = None,
        budget: RetryBudget | None = None,
        deadline: float = CALL_DEADLINE,
        attempts: int = 2,
    ) -> None:
        self._session = session
        self._watches = watches
        self.breakers = breakers if breakers is not None else BreakerBoard()
        self._budget = budget if budget is not None else RetryBudget()
        self._deadline = deadline
        self._attempts = attempts

    async def get_json(
        self, service: str, path: str, *, headers: Mapping[str, str] | None = None, until: float | None = None
    ) -> Any:
        """GET ``path`` on a healthy instance of ``service``.

        ``until`` (loop time) ends the call sooner than its own deadline, as
        a ``TimeoutError``: the request it is made for has less time left
        (``deadlines.call_deadline``). That cut is the caller's, and counts
        against no instance's breaker; only the call's own deadline does.
        Raises ``NoInstances`` (including ``AllBreakersOpen``), ``UpstreamFailure``,
        ``TimeoutError`` or ``UpstreamStatusError``.
        """
        async with asyncio.timeout_at(until):  # None: no cut but the call's own deadline
            return await self._get_json(service, path, headers, until)

    async def _get_json(self, service: str, path: str, headers: Mapping[str, str] | None, until: float | None) -> Any:
        watch = self._watches[service]
        tried: set[str] = set()
        self._budget.record_request()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._deadline
        # When the answer is no use any more, whichever comes first.
        ends = deadline if until is None else min(deadline, until)

        failed: list[Exception] = []

        def giveup(exc: Exception) -> bool:
            # backoff 2.2.1 asks this before it checks max_tries, so after the
            # last attempt too: spend the budget only on a retry that will
            # happen, on an instance that is left.
            if isinstance(exc, (UpstreamFailure, _Declined)):
                failed.append(exc)
            # Too little time left for an answer: a retry would only time
            # out, and count as a failure against an instance that is fine.
            if len(tried) >= self._attempts or ends - loop.time() < MIN_RETRY_SECONDS:
                return True
            if not self.breakers.has_candidate(watch, tried):
                return True
            return not self._budget.try_spend()

        # Waits of 0-20 ms, then 0-40 ms...: ``factor`` scales expo's 1, 2, 4
        # (``base`` would replace the 2), and ``max_time`` cuts a wait short
        # at the deadline.
        @backoff.on_exception(
            backoff.expo,
            (UpstreamFailure, _Declined),
            max_tries=self._attempts,
            max_time=self._deadline,
            factor=0.02,
            jitter=backoff.full_jitter,
            giveup=giveup,
        )
        async def attempt() -> Any:
            if loop.time() >= ends:
                raise TimeoutError(f"{service}: the deadline passed before another attempt")
            try:
                instance = self.breakers.pick(watch, frozenset(tried))
            except NoInstances:
                if failed:  # the set changed during the wait: the failure is the answer
                    raise failed[-1] from None
                raise
            tried.add(instance.id)
            with self.breakers.breaker(instance.id):
                try:
                    # The deadline fires inside the breaker, as a TimeoutError,
                    # so that an instance that hangs counts as failing: a
                    # cancellation from outside would say nothing about it.
                    async with (
                        asyncio.timeout_at(deadline),
                        self._session.get(instance.base_url + path, headers=headers) as resp,
                    ):
                        if resp.status >= 500:
                            if resp.status == 503 and instance_is_well(await resp.read()):
                                raise _Declined(f"{instance.id} declines for now")
                            raise UpstreamFailure(f"{instance.id} answered {resp.status}")
                        raw = await resp.read()
                        if resp.status < 400:
                            return json.loads(raw)
                # ValueError: a success that is not JSON, from an instance that is not well.
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    raise UpstreamFailure(f"{instance.id}: {type(exc).__name__}") from exc
            # Outside the breaker, whatever its body: a 4xx is the caller's
            # problem, and a proxy's plain-text 404 says nothing of the instance.
            raise UpstreamStatusError(resp.status, _json_or_text(raw))

        try:
            return await attempt()
        except _Declined as exc:
            # To the caller, no answer is no answer.
            raise UpstreamFailure(str(exc)) from exc


def _json_or_text(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:  # UnicodeDecodeError is one
        return raw.decode("utf-8", "replace")


SERVICE_CLIENT = web.AppKey("mesh.service_client", ServiceClient)


def http_session_ctx(
    *, limit: int = 200, limit_per_host: int = 100, breakers: BreakerBoard | None = None
) -> CleanupCtx:
    """One ClientSession per app, with keep-alive, and a client for services.

    ``breakers``: the app's own board, where it has one (the gateway's), so
    that what its proxy learns of an instance its calls know too.
    """

    @asynccontextmanager
    async def open_http_session(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit_per_host, keepalive_timeout=30)
        # sock_connect, not connect: aiohttp's connect also covers the wait
        # for a free connection of our own pool, and a burst of calls queued
        # behind it would fail after 1 s and count against a healthy
        # instance. The queue is bounded by each call's deadline instead.
        timeout = aiohttp.ClientTimeout(total=10, sock_connect=1)
        # No cookie jar: a session shared by every caller's requests must never
        # hand one caller's cookies to the next.
        jar = aiohttp.DummyCookieJar()
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, cookie_jar=jar) as session:
            app[HTTP_SESSION] = session
            if WATCHES in app:
                # Bound first: as an argument, mypy would want the key typed as the parameter (a Mapping).
                watches = app[WATCHES]
                app[SERVICE_CLIENT] = ServiceClient(session, watches, breakers=breakers)
            yield

    return open_http_session


__all__ = ["HTTP_SESSION", "SERVICE_CLIENT", "NoInstances", "ServiceClient", "UpstreamStatusError", "http_session_ctx"]
