"""A session's whole life through the public API: Envoy, the gateway, the user-service."""

from __future__ import annotations

import aiohttp
import pytest

from devstack.config import StackConfig

from .conftest import sign_up_and_log_in

pytestmark = pytest.mark.e2e


async def test_a_session_is_refreshed_and_ended_with_its_refresh_token_alone(
    mesh: StackConfig, api: aiohttp.ClientSession
) -> None:
    name, first = await sign_up_and_log_in(api)

    async with api.post("/api/v1/auth/refresh", json={"refresh_token": first["refresh_token"]}) as r:
        assert r.status == 200, await r.text()
        second = await r.json()
    async with api.get("/api/v1/users/me", headers={"Authorization": f"Bearer {second['access_token']}"}) as r:
        assert r.status == 200 and (await r.json())["username"] == name

    # No access token: the refresh token in the body is the proof, as for refresh.
    async with api.post("/api/v1/auth/logout", json={"refresh_token": second["refresh_token"]}) as r:
        assert r.status == 204, await r.text()
    async with api.post("/api/v1/auth/refresh", json={"refresh_token": second["refresh_token"]}) as r:
        assert r.status == 401, await r.text()
        assert r.headers["Content-Type"].startswith("application/problem+json")
        assert (await r.json())["code"] == "INVALID_REFRESH_TOKEN"
