"""RFC 9457 problem details: one exception type, one middleware.

Every error a client sees is ``application/problem+json`` with a stable
UPPER_SNAKE ``code``. A database that is away or too slow is a 503 with
``Retry-After``; other unexpected exceptions become a 500. Neither leaks
``str(exc)``. A client that hung up before its body was in is no error of
ours: logged at info, and recorded as a 499.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import psycopg2
import structlog
from aiohttp import web

from .transactions import CommitOutcomeUnknown, server_cancels_as_errors

PROBLEM_JSON = "application/problem+json"
log = structlog.get_logger()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Problem(Exception):
    """An error with a status, a stable code and a human-readable detail."""

    status = 500
    code = "INTERNAL_ERROR"
    title = "Internal server error"
    # Headers every response of this kind carries (a 401's challenge).
    default_headers: ClassVar[dict[str, str]] = {}

    def __init__(self, detail: str | None = None, *, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.headers = {**self.default_headers, **(headers or {})}
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {
            "type": f"https://todo-mesh.dev/problems/{self.code.lower().replace('_', '-')}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
            **self.extra,
        }


def problem(status: int, code: str, title: str) -> type[Problem]:
    """Declare a Problem subclass in one line: ``TodoNotFound = problem(404, ...)``."""
    # A 401 is an Unauthorized, for the challenge every 401 carries.
    base = Unauthorized if status == 401 else Problem
    return type(code.title().replace("_", ""), (base,), {"status": status, "code": code, "title": title})


class Unauthorized(Problem):
    # A class statement, not ``problem()``: other problems (InvalidToken) extend it.
    status = 401
    code = "UNAUTHORIZED"
    title = "Authentication required"
    # RFC 9110: a 401 must carry at least one challenge.
    default_headers = {"WWW-Authenticate": "Bearer"}


NotFound = problem(404, "NOT_FOUND", "Not found")
MethodNotAllowed = problem(405, "METHOD_NOT_ALLOWED", "Method not allowed")
Forbidden = problem(403, "FORBIDDEN", "Forbidden")
Conflict = problem(409, "CONFLICT", "Conflict")
PayloadTooLarge = problem(413, "PAYLOAD_TOO_LARGE", "Request body too large")
MalformedBody = problem(400, "MALFORMED_BODY", "The request body could not be read")
UnsupportedMediaType = problem(415, "UNSUPPORTED_MEDIA_TYPE", "Expected application/json")
ValidationFailed = problem(422, "VALIDATION_FAILED", "The request body is invalid")
PreconditionFailed = problem(412, "PRECONDITION_FAILED", "The resource has changed")
TooManyRequests = problem(429, "RATE_LIMITED", "Too many requests")
DependencyUnavailable = problem(503, "DEPENDENCY_UNAVAILABLE", "A service this one needs did not answer; try again")
# No Retry-After, and not a 503: the change may have been made, and sent
# again it could be made twice. What to do is to read it back.
OutcomeUnknown = problem(
    500, "OUTCOME_UNKNOWN", "The change may or may not have been made; read it back before sending it again"
)
# A 503 with one of these codes says the instance is well, and declines
# some work for now: callers' breakers (the gateway's, ServiceClient's) do
# not count it, where any other 5xx counts. Counted, a rush of sign-ins that
# filled the user-service's hashing slots (LOAD_SHED), or a few logins while
# its throttle's Redis was away (FEATURE_UNAVAILABLE), opened its breaker,
# and its reads, refreshes and JWKS were refused with it.
LOAD_SHED = "TOO_BUSY"
FEATURE_UNAVAILABLE = "FEATURE_UNAVAILABLE"
_WELL = frozenset({LOAD_SHED, FEATURE_UNAVAILABLE})
# One feature waits on something only it needs; the rest of the service
# works. Not DependencyUnavailable, which is counted: without its database an
# instance can answer nothing.
FeatureUnavailable = problem(503, FEATURE_UNAVAILABLE, "This feature is unavailable for a moment; try again")


def instance_is_well(body: bytes) -> bool:
    """Whether a 503's body is a problem whose code says the instance is well: it declines some work for now."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return False
    return isinstance(parsed, dict) and parsed.get("code") in _WELL


def problem_response(exc: Problem) -> web.Response:
    return web.Response(
        status=exc.status,
        body=json.dumps(exc.body()).encode(),
        content_type=PROBLEM_JSON,
        headers=exc.headers,
    )


# nginx's "client closed request": never sent, only what the access log
# records for a request whose client left first, which is no server error
# (every service's, the gateway's among them).
CLIENT_GONE = 499
# What aiohttp's own errors say that a client needs (a 405's Allow).
_KEPT_HEADERS = ("Allow", "Retry-After", "WWW-Authenticate")
_HTTP_TO_PROBLEM: dict[int, type[Problem]] = {
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
}


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        with server_cancels_as_errors():
            return await handler(request)
    except Problem as exc:
        return problem_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = _HTTP_TO_PROBLEM.get(exc.status)
        if kind is None:
            kind = problem(exc.status, f"HTTP_{exc.status}", exc.reason)
        kept = {name: exc.headers[name] for name in _KEPT_HEADERS if name in exc.headers}
        return problem_response(kind(headers=kept))
    except web.RequestPayloadError:
        # A body that does not decompress as its Content-Encoding says, or
        # whose chunked framing breaks off: the client's doing, seen only
        # once the handler reads it.
        response = problem_response(MalformedBody("The request body does not decode as its headers say"))
        # What is left of that body cannot be read past: the connection ends
        # here, or the next request on it would meet the broken decoder.
        response.force_close()
        return response
    except (TimeoutError, psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
        # Refused, dropped or shut down, a statement past aiopg's timeout (it
        # closes that connection) or cancelled by the server, a lock not
        # granted in time, a transaction the server ended as idle (the
        # limits of db.SessionLimits; each rolled back), a pool with none
        # free: the request may well work in a moment, which is what 503
        # says and 500 does not.
        log.warning("dependency_unavailable", path=request.path, method=request.method, error=type(exc).__name__)
        return problem_response(DependencyUnavailable(headers={"Retry-After": "1"}))
    except CommitOutcomeUnknown:
        return problem_response(OutcomeUnknown())
    except ConnectionResetError:
        # aiohttp fails a body still being read with this once its client has
        # hung up (a cancelled upload, a proxy's slow-client guard): no one is
        # left to answer. From anything else, with the client still there, it
        # is the bug it looks like.
        if request.transport is not None and not request.transport.is_closing():
            return _unhandled(request)
        log.info("client_gone_before_body", path=request.path, method=request.method)
        response = web.Response(status=CLIENT_GONE, reason="Client Closed Request")
        response.force_close()
        return response
    except Exception:
        return _unhandled(request)


def _unhandled(request: web.Request) -> web.Response:
    log.exception("unhandled_error", path=request.path, method=request.method)
    return problem_response(Problem())


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 415/422 problem."""
    if request.content_type != "application/json":
        raise UnsupportedMediaType()
    try:
        body = await request.json()
    except LookupError:  # a charset Python does not know
        raise UnsupportedMediaType(f"Unknown charset {request.charset!r}") from None
    except (ValueError, RecursionError):
        # ValueError: bad JSON or bad UTF-8, and also an integer of more
        # digits than Python converts; RecursionError: arrays nested
        # thousands deep, which fit in a small body.
        raise ValidationFailed("The body is not valid JSON", errors=[]) from None
    if not isinstance(body, dict):
        raise ValidationFailed("The body must be a JSON object", errors=[])
    return body
