"""The gateway's public routes and the services' own agree.

A route the gateway lets through without a token, but the service guards,
is a route nobody can use (a confirmation code that cannot be sent back);
one the service leaves open and the gateway does not, the same. Both lists
are written by hand, in two packages: compared here, route by route.
"""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from mesh_gateway.routes import API
from user_service.routes import PUBLIC_ROUTES, setup_routes

# Each service's URL map and public list, by the name the gateway knows it by.
SERVICES = {"user-service": (setup_routes, PUBLIC_ROUTES)}


@pytest.mark.parametrize(("method", "path"), sorted(API.public))
async def test_each_public_route_is_public_in_its_service(method: str, path: str) -> None:
    route = API.match(path)
    assert route is not None, f"{path} is public, but no route takes it"
    setup, public = SERVICES[route.service]
    app = web.Application()
    setup(app)
    upstream = route.upstream_path(path)
    assert upstream is not None
    match = await app.router.resolve(make_mocked_request(method, upstream, app=app))
    name = match.route.name
    assert name is not None, f"{route.service} does not serve {method} {upstream}"
    assert (method, name) in public, f"{route.service} wants a token for {method} {upstream} ({name})"


def test_every_public_user_service_route_is_public_through_the_gateway() -> None:
    setup, public = SERVICES["user-service"]
    app = web.Application()
    setup(app)
    served = {(r.method, r.name): r.resource.canonical for r in app.router.routes() if r.resource is not None}
    through_gateway = set()
    for method, path in API.public:
        route = API.match(path)
        if route is not None and route.service == "user-service":
            through_gateway.add((method, route.upstream_path(path)))
    # Kept from the public API on purpose: services trade their secrets for tokens there.
    internal = {path.removeprefix("/api/v1") for path in API.internal}
    for method, name in sorted(public):
        path = served[(method, name)]
        if path not in internal:
            assert (method, path) in through_gateway, f"the gateway wants a token for {method} {path} ({name})"
