"""A relay killed with events claimed and not yet confirmed loses none of them.

The instance is a real process, ``python -m todo_service``, killed with
SIGKILL: nothing of it runs after, no rollback of its own, no goodbye to
Consul. Its AMQP connection goes through a TCP proxy to the real broker
(this suite's virtual host); PostgreSQL it reaches directly. Frozen, the
proxy holds the publish that follows a claim, and the broker's confirm:
the relay waits on them with the row locked in its transaction, which the
test sees in PostgreSQL, and kills the process there. A second instance,
straight to the broker, must then publish the event.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import aiopg
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer
from yarl import URL

from devstack.config import StackConfig
from mesh_common.consul import consul_client
from mesh_common.testing import TokenFactory
from mesh_common.testing.process import ServiceProcess
from mesh_common.testing.proxy import TcpProxy

from .conftest import EventTap, Poll, User
from .relay_support import all_published, locked, outbox


@pytest.fixture
async def user_service(aiohttp_server: AiohttpServer, infra: StackConfig, tokens: TokenFactory) -> AsyncIterator[str]:
    """A user-service in Consul under a name of this test's own, serving the JWKS ``tokens`` signs with: its name."""

    async def jwks(request: web.Request) -> web.Response:
        return web.json_response(tokens.jwks())

    fake = web.Application()
    fake.router.add_get("/.well-known/jwks.json", jwks)
    server = await aiohttp_server(fake)
    name = f"user-service-test-{uuid.uuid4().hex[:12]}"
    service_id = f"{name}-{server.port}"
    consul = consul_client(infra.consul_url)
    await consul.agent.service.register(name, service_id=service_id, address="127.0.0.1", port=server.port)
    try:
        yield name
    finally:
        await consul.agent.service.deregister(service_id)
        await consul.close()


async def published(db: aiopg.Pool) -> list[str]:
    """The ids of the outbox's events marked sent."""
    return [event_id for event_id, sent in (await outbox(db)).items() if sent]


async def unlocked(db: aiopg.Pool, event_id: str) -> bool:
    return not await locked(db, event_id)


async def create(http: aiohttp.ClientSession, base: str, user: User, title: str) -> dict[str, Any]:
    async with http.post(f"{base}/todos", json={"title": title}, headers=user.headers) as resp:
        assert resp.status == 201, await resp.text()
        created: dict[str, Any] = await resp.json()
    return created


async def lists(http: aiohttp.ClientSession, base: str, user: User) -> bool:
    async with http.get(f"{base}/todos", headers=user.headers) as resp:
        return resp.status == 200


async def test_a_relay_that_dies_before_publishing_loses_no_event(
    infra: StackConfig,
    amqp_url: str,
    alice: User,
    db: aiopg.Pool,
    event_tap: Callable[..., Awaitable[EventTap]],
    poll: Poll,
    user_service: str,
) -> None:
    tap = await event_tap("todo.created")
    proxy = TcpProxy(infra.ports.amqp)
    await proxy.start()
    env = {
        **infra.service_env("todo"),
        "PATH": os.environ.get("PATH", ""),
        "AMQP_URL": amqp_url,
        "USER_SERVICE_NAME": user_service,
        "LOG_FORMAT": "json",
    }
    killed = ServiceProcess("todo_service", {**env, "AMQP_URL": str(URL(amqp_url).with_port(proxy.port))})
    restarted = ServiceProcess("todo_service", env)
    consul = consul_client(infra.consul_url)
    try:
        await killed.start()
        base = await killed.url()
        async with aiohttp.ClientSession() as http:
            # Until the instance's watch has found the user-service, and with it the JWKS.
            await poll(lambda: lists(http, base, alice), within=15)
            # A first event through the relay: its channel is open, confirms
            # and all. Frozen sooner, the relay would wait for its channel,
            # and claim nothing.
            await create(http, base, alice, "Before the freeze")
            [first] = await poll(lambda: published(db), within=15)
            assert (await tap.next()).message_id == first

            proxy.freeze()
            created = await create(http, base, alice, "Survive the kill")
            [event_id] = set(await outbox(db)) - {first}
            # Claimed, published into the frozen proxy, and waiting for a
            # confirm that cannot come: for two confirm timeouts (10 s), then the batch fails.
            await poll(lambda: locked(db, event_id), within=5)

        assert await killed.kill() == -signal.SIGKILL
        await proxy.cut()  # what it held for the broker goes nowhere
        assert await outbox(db) == {first: True, event_id: False}, "the event must still be waiting in the outbox"
        # The kill ends the claim's session, as soon as the server reads the connection's end.
        await poll(lambda: unlocked(db, event_id), within=5)
        assert await tap.everything_confirmed("todo.created") == []  # and the broker never had it

        await restarted.start()
        message = await tap.next(within=30)
        event = json.loads(message.body)
        assert message.message_id == event["id"] == event_id
        assert event["type"] == "todo.created" and event["data"]["id"] == created["id"]
        await poll(lambda: all_published(db))
        assert await outbox(db) == {first: True, event_id: True}
        assert await restarted.stop() == 0
    finally:
        async with contextlib.AsyncExitStack() as cleanup:  # each step whatever the one before did
            cleanup.push_async_callback(consul.close)
            # A killed instance could not leave Consul by itself.
            cleanup.push_async_callback(restarted.leave_consul, consul)
            cleanup.push_async_callback(killed.leave_consul, consul)
            cleanup.push_async_callback(proxy.close)
            cleanup.push_async_callback(restarted.kill)
            cleanup.push_async_callback(killed.kill)
    assert killed.not_json == restarted.not_json == []  # LOG_FORMAT=json: every line
