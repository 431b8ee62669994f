"""The reverse proxy: pick a healthy instance at random, forward, fail well.

* Instances come from the in-memory Consul watch; a request never waits on Consul.
* One breaker per instance: refusals, timeouts and 5xx count, 4xx never do,
  nor does a 503 whose code says the instance is well (TOO_BUSY, which
  sheds load, or FEATURE_UNAVAILABLE: mesh_common.problems.instance_is_well),
  or that came, after a wait for a connection of our own, once the budget
  the wait left it had run out.
* A request that was never sent, or an idempotent one (GET, HEAD, PUT,
  DELETE, OPTIONS, or a POST with an Idempotency-Key), is retried once on a
  *different* instance; retries of requests that were sent spend the
  service's budget.
* The service is told how long the gateway will wait (``BUDGET``): it
  gives up first, with its 503, rather than commit after the gateway's 504.
* Outcomes: timeout (connecting or answering) -> 504, nothing healthy or
  every breaker open -> 503 with Retry-After, unreachable or broken
  upstream -> 502, all problem+json. An upstream's own 5xx problem body is
  passed through when no retry helps; any other 5xx body is not (a 502).
  A timeout once a request not safe to repeat was sent: its outcome is unknown.
"""

from __future__ import annotations

import asyncio
import re

import structlog
from aiohttp import web
from multidict import CIMultiDict

from mesh_common.deadlines import BUDGET_HEADER, MIN_BUDGET
from mesh_common.discovery import Instance, NoInstances, ServiceWatch
from mesh_common.problems import MalformedBody, NotFound, instance_is_well, problem
from mesh_common.requests import LEAVING, REQUEST_ID, REQUEST_ID_HEADER
from mesh_common.resilience import AllBreakersOpen, BreakerBoard, RetryBudget, UpstreamFailure

from .downstream import ClientGone, hang_up, to_client
from .headers import forward_headers, inflated_by_aiohttp, is_problem, without_hop_by_hop
from .routes import Route, RouteTable
from .upstream import (
    BudgetHeader,
    PoolTimeout,
    QueuedTimeout,
    Upstream,
    UpstreamBroken,
    UpstreamConnectError,
    UpstreamResponse,
)

NoHealthyUpstream = problem(503, "NO_HEALTHY_UPSTREAM", "No healthy instance of the service is available")
UpstreamCircuitOpen = problem(503, "UPSTREAM_CIRCUIT_OPEN", "The service is failing; calls are paused")
UpstreamTimeout = problem(504, "UPSTREAM_TIMEOUT", "The service did not answer in time")
# Sent, not safe to repeat: the service may yet make the change (a COMMIT it
# let finish, a loop that started its clock late). No Retry-After, as OUTCOME_UNKNOWN.
UpstreamOutcomeUnknown = problem(
    504, "UPSTREAM_OUTCOME_UNKNOWN", "The service did not answer in time: read the change back before sending it again"
)
BadGateway = problem(502, "BAD_GATEWAY", "The service could not be reached or answered badly")

IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
# The first attempt and one retry on another instance, each with the route's
# deadline: Envoy's route timeout must outlast all of them (tests/config).
MAX_ATTEMPTS = 2
# "." or ".." as a path segment, once decoded: never a published route.
_DOT_SEGMENT = re.compile(r"(^|/)\.{1,2}(/|$)")
# Responses up to this size are read whole: one write is cheaper than a stream.
BUFFER_LIMIT = 256 * 1024
# Of an attempt's deadline, what a service is not told of (mesh_common.deadlines):
# for its answer to come back (a 503 at its deadline, a COMMIT begun just in
# time), and its loop's lag in starting its clock. 5 s routes leave it 4.5 s.
RETURN_MARGIN = 0.5
BUDGET = BudgetHeader(BUDGET_HEADER, margin=RETURN_MARGIN, least=MIN_BUDGET)
# A 503 this close to the end of its budget is taken as cut by it: timers' granularity.
BUDGET_SLACK = 0.001
log = structlog.get_logger()


class _Attempt(Exception):
    """One failed attempt, with what the client gets if nothing else works."""

    def __init__(self, problem_: Exception | None = None, *, sent: bool, response: web.StreamResponse | None = None):
        super().__init__()
        self.problem = problem_
        self.sent = sent
        self.response = response


class _Failed(_Attempt, UpstreamFailure):
    """A failed attempt that is the instance's doing: raised inside its breaker, it counts."""


class Proxy:
    def __init__(
        self,
        table: RouteTable,
        upstream: Upstream,
        watches: dict[str, ServiceWatch],
        breakers: BreakerBoard,
        *,
        expose_upstream: bool,
    ) -> None:
        self._table = table
        self._upstream = upstream
        self._watches = watches
        self._breakers = breakers
        # One budget per service: shared, an outage of one service could
        # spend the retries every other one's traffic earned, and get twice
        # its own load.
        self._budgets = {service: RetryBudget() for service in watches}
        self._expose_upstream = expose_upstream

    async def handle(self, request: web.Request) -> web.StreamResponse:
        route = self._table.match(request.path)
        # Matched on the decoded path, as the guard and the upstream read it;
        # forwarded as the client encoded it (decoding would turn %2F, %3F or
        # %2E%2E into structure the upstream never published), so the prefix
        # stripped must be spelled out in the raw path too.
        target = None if route is None else route.upstream_path(request.rel_url.raw_path)
        if route is None or target is None or _DOT_SEGMENT.search(request.path):
            raise NotFound(f"No route for {request.path}")
        if request.rel_url.raw_query_string:
            target += "?" + request.rel_url.raw_query_string
        # A client gone before its body was in (a cancelled upload, Envoy's
        # slow-client guard) fails this read: mesh_common.problems records a 499.
        body = await request.read() if request.can_read_body else None
        headers = forward_headers(request)
        encodings = request.headers.getall("Content-Encoding", ())
        if body is not None and encodings:
            if len(encodings) > 1:
                # aiohttp's parsers disagree on which of them they inflate by.
                raise MalformedBody("Content-Encoding must be sent once")
            if inflated_by_aiohttp(encodings[0]):
                # What goes on is plain (and was held to the body limit
                # inflated): it must not say otherwise. It may be gone
                # already: named in Connection, it is hop-by-hop.
                headers.popall("Content-Encoding", None)
        method = request.method
        # A POST is safe to repeat only where the service deduplicates by key.
        retry_safe = method in IDEMPOTENT or (
            method == "POST" and request.path in route.idempotency_key_paths and "Idempotency-Key" in headers
        )
        watch, budget = self._watches[route.service], self._budgets[route.service]
        budget.record_request()
        tried: set[str] = set()
        while True:
            instance = self._pick(watch, frozenset(tried))
            tried.add(instance.id)
            structlog.contextvars.bind_contextvars(upstream=instance.id)
            try:
                return await self._attempt(request, route, instance, method, target, headers, body)
            except _Attempt as failed:
                if failed.response is not None and failed.response.prepared:
                    return failed.response  # a broken stream: nothing more can be sent
                others = self._breakers.has_candidate(watch, tried)
                retry = len(tried) < MAX_ATTEMPTS and others and (not failed.sent or retry_safe)
                # A request that never left costs no upstream anything: only
                # retries of requests that were sent spend the budget.
                if not retry or (failed.sent and not budget.try_spend()):
                    if failed.response is not None:
                        return failed.response
                    if failed.sent and not retry_safe and isinstance(failed.problem, UpstreamTimeout):
                        raise UpstreamOutcomeUnknown() from None
                    assert failed.problem is not None
                    raise failed.problem from None
                log.info("upstream_retry", service=route.service, failed=instance.id)

    def _pick(self, watch: ServiceWatch, exclude: frozenset[str]) -> Instance:
        try:
            return self._breakers.pick(watch, exclude)
        except AllBreakersOpen:
            retry_after = self._breakers.retry_after(watch)
            raise UpstreamCircuitOpen(headers={"Retry-After": str(retry_after)}) from None
        except NoInstances:
            raise NoHealthyUpstream(headers={"Retry-After": "1"}) from None

    async def _attempt(
        self,
        request: web.Request,
        route: Route,
        instance: Instance,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes | None,
    ) -> web.StreamResponse:
        # The route's deadline is for the answer's head (and a body small
        # enough to buffer); a streamed body gets as long between chunks.
        deadline = asyncio.get_running_loop().time() + route.timeout
        try:
            with self._breakers.breaker(instance.id) as call:
                queued = False  # whether it waited for a connection of ours: known with the head
                try:
                    resp = await self._upstream.request(
                        method,
                        instance.address,
                        instance.port,
                        target,
                        headers.items(),
                        body,
                        deadline=deadline,
                        budget=BUDGET,
                    )
                    queued = resp.queued
                    payload = None
                    if resp.status >= 500 or (resp.content_length is not None and resp.content_length <= BUFFER_LIMIT):
                        # A 5xx is held whole, to be returned if no retry
                        # works out, but never more of it than a small body.
                        payload = await resp.read(limit=BUFFER_LIMIT, deadline=deadline)
                except PoolTimeout:
                    # Our own connections to it were all busy (or one came free too late
                    # to connect in): nothing was sent, and nothing is known about the
                    # instance, so its breaker hears nothing.
                    log.warning("upstream_pool_full", upstream=instance.id)
                    raise _Attempt(UpstreamTimeout(), sent=False) from None
                except UpstreamConnectError as exc:
                    # Refused is unreachable; no answer by the connect deadline is a timeout.
                    raise _Failed(UpstreamTimeout() if exc.timed_out else BadGateway(), sent=False) from None
                except TimeoutError as exc:
                    if isinstance(exc, QueuedTimeout) or queued:
                        # Its time was spent partly in our own queue, whether the head or
                        # the buffered body was late: not the instance's fault.
                        log.warning("upstream_late_after_pool_wait", upstream=instance.id)
                        raise _Attempt(UpstreamTimeout(), sent=True) from None
                    raise _Failed(UpstreamTimeout(), sent=True) from None
                except UpstreamBroken:
                    raise _Failed(BadGateway(), sent=True) from None
                if payload is None:
                    # Streamed inside the breaker: an upstream that dies or stalls
                    # mid-body counts. But a good head is all a probe asks.
                    call.settle()
                    return await self._stream(request, resp, instance, idle=route.timeout)
                out = without_hop_by_hop(resp.headers)
                if method == "HEAD" and resp.content_length is not None:
                    # No body, but the length a GET would have: that is what HEAD is for.
                    out["Content-Length"] = str(resp.content_length)
                if resp.status >= 500:
                    if not is_problem(out):
                        # A framework's error page, a stack trace: not for a
                        # client, and not in the shape every error has here.
                        log.warning("upstream_error_not_a_problem", upstream=instance.id, status=resp.status)
                        raise _Failed(BadGateway(), sent=True)
                    answer = web.Response(status=resp.status, body=payload, headers=out)
                    # Out of the budget our own queue left it, as a QueuedTimeout (but a 503 with
                    # some left is the instance's, its database away); or well, and declining some
                    # work for now (mesh_common.problems.instance_is_well).
                    spent = resp.queued and resp.budget_left <= BUDGET_SLACK
                    # A HEAD's 503 has no body to tell a well instance's from a failing
                    # one's. Counted, a monitor's HEADs alone opened the breaker of an
                    # instance shedding logins; let off, its other answers still tell.
                    untold = method == "HEAD"
                    if resp.status == 503 and (spent or untold or instance_is_well(payload)):
                        raise _Attempt(sent=True, response=answer)
                    raise _Failed(sent=True, response=answer)
                response = web.Response(status=resp.status, body=payload, headers=out)
                return self._mark(response, instance)
        except ClientGone as gone:
            return gone.response

    async def _stream(
        self, request: web.Request, resp: UpstreamResponse, instance: Instance, *, idle: float
    ) -> web.StreamResponse:
        headers = without_hop_by_hop(resp.headers)
        # Set now: the request middleware's own comes after the handler,
        # when a stream's head has long gone out.
        headers[REQUEST_ID_HEADER] = request[REQUEST_ID]
        response = self._mark(web.StreamResponse(status=resp.status, headers=headers), instance)
        # A known length is kept (no chunking); a body cut short cuts the connection.
        response.content_length = resp.content_length
        if request.app[LEAVING].now:
            # Said in the head, as the request middleware says it in a buffered answer's.
            response.force_close()
        try:
            await to_client(request, response, response.prepare(request), idle)
            while True:
                try:
                    async with asyncio.timeout(idle):
                        chunk = await resp.next_chunk()
                except (UpstreamBroken, TimeoutError) as exc:
                    # The status line is already out: the only honest signal left to
                    # the client is a cut connection, never a second response.
                    log.warning("upstream_stream_broken", upstream=instance.id, error=type(exc).__name__)
                    hang_up(request)
                    raise _Failed(sent=True, response=response) from None
                if chunk is None:
                    break
                await to_client(request, response, response.write(chunk), idle)
            await to_client(request, response, response.write_eof(), idle)
        finally:
            resp.release()  # closes the upstream connection unless its body was read to the end
        return response

    def _mark(self, response: web.StreamResponse, instance: Instance) -> web.StreamResponse:
        if self._expose_upstream:
            response.headers["X-Upstream-Instance"] = instance.id
        return response
