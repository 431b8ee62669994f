"""A trivial service for the gateway benchmark: the cheapest real upstream.

It is a mesh citizen like any other (registered in Consul with an HTTP
check, served by mesh_common), so the benchmark measures the gateway's cost
and nothing else.
"""

from __future__ import annotations

import os

from aiohttp import web

from mesh_common.app import service_app
from mesh_common.consul import consul_ctx
from mesh_common.logs import configure_logging
from mesh_common.registration import registration_ctx
from mesh_common.serve import bind_socket, run
from mesh_common.settings import ServiceSettings


async def ping(request: web.Request) -> web.Response:
    return web.json_response({"pong": True})


def create_app(settings: ServiceSettings) -> web.Application:
    # No request deadline: it waits on nothing that could hang, and the
    # deadline's timer costs ~6 us a request, 6% of this service's cost,
    # which would raise the gateway ratio for nothing the gateway did.
    app = service_app(settings, deadline=None)
    app.router.add_get("/echo/ping", ping, name="echo.ping")
    app.cleanup_ctx.extend([consul_ctx(settings), registration_ctx()])
    return app


if __name__ == "__main__":
    settings = ServiceSettings.from_env(os.environ, name="bench-echo", version="bench")
    configure_logging(settings.log_format)
    sock = bind_socket(settings.host, settings.port)
    run(create_app(settings.with_port(sock.getsockname()[1])), sock)
