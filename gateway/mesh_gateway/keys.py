"""Typed app state of the gateway."""

from aiohttp import web

from mesh_common.resilience import BreakerBoard

from .proxy import Proxy
from .ratelimit import RateLimiter
from .routes import RouteTable
from .settings import Settings
from .upstream import Upstream

SETTINGS = web.AppKey("gateway.settings", Settings)
BREAKERS = web.AppKey("gateway.breakers", BreakerBoard)
PROXY = web.AppKey("gateway.proxy", Proxy)
RATE_LIMITER = web.AppKey("gateway.rate_limiter", RateLimiter)
ROUTE_TABLE = web.AppKey("gateway.route_table", RouteTable)
UPSTREAM = web.AppKey("gateway.upstream", Upstream)
