"""Request identity and the canonical access-log line.

``X-Request-ID`` is taken from the caller (Envoy generates one at the edge)
or made here, bound to structlog's context for every line the request logs,
and echoed back. Downstream calls and AMQP messages carry it on.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from .problems import Handler

REQUEST_ID_HEADER = "X-Request-ID"
# Accept only ids that are safe to log and to pass on as a header.
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
REQUEST_ID = web.RequestKey("mesh.request_id", str)
access_log = structlog.get_logger("access")

# Probes would drown the access log: Consul checks every instance every second.
_QUIET_PATHS = frozenset({"/health", "/health/live", "/ready"})


def request_id_of(request: web.Request) -> str:
    candidate = request.headers.get(REQUEST_ID_HEADER, "")
    # 128 random bits as hex, like uuid4().hex, at a third of the cost.
    return candidate if _SAFE_ID.fullmatch(candidate) else os.urandom(16).hex()


@dataclass(slots=True)
class Leaving:
    """Whether the instance has been told to stop: its connections then close after each answer."""

    now: bool = False


LEAVING = web.AppKey("mesh.leaving", Leaving)


def request_context_middleware(leaving: Leaving) -> Middleware:
    """Request ids and the access log; and, once ``leaving.now``, ``Connection: close`` on every answer.

    A leaving instance keeps serving while its callers learn it is gone
    (mesh_common.serve), and then closes its idle keep-alive connections.
    A caller can write a request onto one just as it closes, and cannot tell
    whether it was read: not safe to send again, unless idempotent. Told to
    close with each answer instead, a caller opens a new connection for the
    next request, and once the listener has closed, that connect is refused,
    which is safe to retry on another instance whatever the request.
    """

    @web.middleware
    async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = request_id_of(request)
        request[REQUEST_ID] = request_id
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            response.headers[REQUEST_ID_HEADER] = request_id
            if leaving.now:
                # Its head not yet written, it says so. A handler that streams has
                # written its head already: it must do this before it prepares
                # (the gateway's proxy does), or the connection closes unannounced.
                response.force_close()
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            if request.path not in _QUIET_PATHS:
                access_log.info(
                    "request",
                    method=request.method,
                    path=request.path,
                    status=status,
                    duration_ms=round((time.perf_counter() - started) * 1000, 2),
                )

    return request_context
