"""The whole native stack, for end-to-end tests: Envoy -> gateway -> services."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from devstack import sessions
from devstack.config import StackConfig


@pytest.fixture(scope="package")
def mesh(infra: StackConfig) -> Iterator[StackConfig]:
    """Every service, the gateway and Envoy, one instance each, all healthy.

    Stopped when the end-to-end tests end, whatever runs after them: their
    outbox relays would otherwise publish the rows other suites' tests write.
    """
    with sessions.mesh(infra):
        yield infra


@pytest.fixture
async def api(mesh: StackConfig) -> AsyncIterator[aiohttp.ClientSession]:
    """A client of the public API, through Envoy."""
    async with aiohttp.ClientSession(base_url=mesh.api_url, timeout=aiohttp.ClientTimeout(total=15)) as session:
        yield session


async def sign_up_and_log_in(api: aiohttp.ClientSession) -> tuple[str, dict[str, Any]]:
    """A new user, through the public API: their username and the login's token pair."""
    name = f"e2e_{uuid.uuid4().hex[:12]}"
    password = f"pw-{uuid.uuid4().hex}"
    async with api.post(
        "/api/v1/users", json={"username": name, "email": f"{name}@example.test", "password": password}
    ) as r:
        assert r.status == 201, await r.text()
    async with api.post("/api/v1/auth/login", json={"username": name, "password": password}) as r:
        assert r.status == 200, await r.text()
        return name, await r.json()


async def register_and_login(api: aiohttp.ClientSession) -> dict[str, str]:
    """A new user's Authorization header, obtained through the public API."""
    _, tokens = await sign_up_and_log_in(api)
    return {"Authorization": f"Bearer {tokens['access_token']}"}
