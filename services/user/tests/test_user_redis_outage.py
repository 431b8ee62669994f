"""With Redis away, only logins stop: the instance stays in service for everything else.

Every instance shares the one Redis, so a readiness check that failed on it
would take them all out of discovery at once, and with them profiles,
refreshes and the key set that every verifier fetches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from pytest_aiohttp import AiohttpClient

from mesh_common.problems import instance_is_well
from mesh_common.testing import refused_port
from user_service.app import create_app
from user_service.settings import Settings

from .conftest import PASSWORD, SERVICE_SECRET, Auth, Client, Login, Register


@pytest.fixture
def refused_url() -> Iterator[str]:
    with refused_port() as port:
        yield f"redis://127.0.0.1:{port}/0"


async def test_without_redis_logins_are_503_and_the_rest_goes_on(
    aiohttp_client: AiohttpClient,
    settings: Settings,
    client: Client,
    register: Register,
    login: Login,
    auth: Auth,
    refused_url: str,
) -> None:
    await register("ada")
    session = await login("ada")  # while Redis is there
    cut_off = await aiohttp_client(create_app(dataclasses.replace(settings, redis_url=refused_url), register=False))

    health = await cut_off.get("/health")
    assert health.status == 200, await health.text()  # still ready: Consul keeps it in the healthy set
    body = await health.json()
    assert body["status"] == "degraded"
    assert body["checks"]["redis"].startswith("failing")
    assert body["checks"]["postgres"] == "ok"

    refused = await cut_off.post("/auth/login", json={"username": "ada", "password": PASSWORD})
    assert refused.status == 503  # never let through unthrottled
    assert refused.headers["Content-Type"] == "application/problem+json"
    # A code that callers' breakers do not count: logins are down, the instance is not.
    assert (await refused.json())["code"] == "FEATURE_UNAVAILABLE"
    assert instance_is_well(await refused.read())
    assert int(refused.headers["Retry-After"]) >= 1

    me = await cut_off.get("/users/me", headers=auth(session["access_token"]))
    assert me.status == 200, await me.text()
    refreshed = await cut_off.post("/auth/refresh", json={"refresh_token": session["refresh_token"]})
    assert refreshed.status == 200, await refreshed.text()
    assert (await cut_off.get("/.well-known/jwks.json")).status == 200
    # Services inside the network keep getting their tokens: their calls to
    # this one need them, and a refusal would spread the outage to them.
    issued = await cut_off.post(
        "/auth/service-token", json={"client_id": "notification-service", "client_secret": SERVICE_SECRET}
    )
    assert issued.status == 200, await issued.text()
