"""Fixtures for the notification-service suite: the real broker, database, Consul and SMTP.

Each test run gets a private copy of our broker topology (see
``private_definitions``); each test starts with its queues purged, its tables
truncated, a fresh fake user-service in Consul and its own SMTP server.
"""

from __future__ import annotations

import contextlib
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aio_pika
import aiopg
import pytest

from devstack.config import StackConfig
from mesh_common.settings import ServiceSettings
from mesh_common.testing import HeldPort, LeavesConsulFirst, TokenFactory
from mesh_common.testing.database import MigratedDatabase
from notification_service.app import MIGRATIONS, create_app
from notification_service.settings import Settings, SmtpSettings
from notification_service.topology import Topology

# The helpers module sits next to this file; its name is unique across the
# repository's suites, which share one pytest session.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from notification_support import (
    MAIL_FROM,
    SECRET,
    Broker,
    Client,
    FakeUserService,
    Management,
    StartService,
    private_definitions,
)
from smtp_sink import SmtpSink


@pytest.fixture(scope="session")
def management(infra: StackConfig) -> Management:
    return Management(infra)


@pytest.fixture(scope="session")
def topology(management: Management) -> Iterator[Topology]:
    definitions, topology = private_definitions(f"t{uuid.uuid4().hex[:8]}")
    management.import_definitions(definitions)
    yield topology
    management.delete_definitions(definitions)


@pytest.fixture(scope="session")
def delivery_limit(management: Management, topology: Topology) -> int:
    """The private queue's delivery-limit, once its policy is seen in force.

    Policies apply asynchronously, and the management API reports them only
    at its next statistics round (a few seconds).
    """
    deadline = time.monotonic() + 30
    while True:
        policy = management.queue(topology.queue).get("effective_policy_definition") or {}
        if "delivery-limit" in policy:
            return int(policy["delivery-limit"])
        assert time.monotonic() < deadline, "the private queue's policy never applied"
        time.sleep(0.2)


@pytest.fixture
def own_topology(management: Management) -> Iterator[Topology]:
    """A private topology for one test, which may break it (delete a queue)."""
    definitions, topology = private_definitions(f"o{uuid.uuid4().hex[:8]}")
    management.import_definitions(definitions)
    deadline = time.monotonic() + 30
    while "delivery-limit" not in (management.queue(topology.queue).get("effective_policy_definition") or {}):
        assert time.monotonic() < deadline, "the private queue's policy never applied"
        time.sleep(0.2)
    yield topology
    management.delete_definitions(definitions)


@pytest.fixture
async def broker(infra: StackConfig, topology: Topology) -> AsyncIterator[Broker]:
    connection = await aio_pika.connect(infra.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        for name in (topology.queue, *topology.retry_queues, topology.dead_letters):
            await (await channel.get_queue(name)).purge()
        yield Broker(channel, await channel.get_exchange(topology.exchange), topology)


@pytest.fixture
async def pool(migrated_database: MigratedDatabase) -> AsyncIterator[aiopg.Pool]:
    """The notifications database, migrated and emptied."""
    async with aiopg.create_pool(await migrated_database("notification", MIGRATIONS), minsize=1, maxsize=4) as pool:
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("TRUNCATE notifications, reminders")
        yield pool


@pytest.fixture
async def users(infra: StackConfig) -> AsyncIterator[FakeUserService]:
    fake = FakeUserService(infra.consul_url, f"user-service-test-{uuid.uuid4().hex[:8]}")
    try:  # closed even if it fails to start: its port is bound from the start
        await fake.start()
        await fake.register()
        try:
            yield fake
        finally:
            await fake.deregister()
    finally:
        await fake.close()


@pytest.fixture
async def smtp() -> AsyncIterator[SmtpSink]:
    sink = SmtpSink()
    try:  # closed even if it fails to start: its port is bound from the start
        await sink.start()
        yield sink
    finally:
        await sink.close()


@pytest.fixture
def tokens() -> TokenFactory:
    return TokenFactory()


@pytest.fixture
def settings(infra: StackConfig, topology: Topology, users: FakeUserService, smtp: SmtpSink) -> Settings:
    return Settings(
        service=ServiceSettings(
            # Its own name in Consul, so that a whole-stack run never routes to it.
            name=f"notification-service-test-{uuid.uuid4().hex[:8]}",
            version="test",
            host="127.0.0.1",
            port=0,  # each instance's own: see start_service
            advertise_address="127.0.0.1",
            consul_url=infra.consul_url,
            log_format="console",
        ),
        database_url=infra.database_url("notification"),
        amqp_url=infra.amqp_url,
        smtp=SmtpSettings(host="127.0.0.1", port=smtp.port, mail_from=MAIL_FROM, timeout=2.0),
        client_secret=SECRET,
        user_service=users.name,
        topology=topology,
        reminder_poll_interval=0.5,
    )


@pytest.fixture
def start_service(
    settings: Settings,
    pool: aiopg.Pool,
    broker: Broker,
    tokens: TokenFactory,
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> Iterator[StartService]:
    """Start the app in-process, with ``settings`` changed by keyword arguments.

    Each call starts an instance of its own, on a port of its own, as
    ``__main__`` does: bound before the app is built (it registers the port in
    Consul as it starts, before it listens) and held until it listens.
    """
    with contextlib.ExitStack() as ports:  # closes what an instance that failed to start never took

        async def start(**changes: Any) -> Client:
            held = ports.enter_context(HeldPort())
            app = create_app(replace(settings, **changes).with_port(held.port), verifier=tokens.verifier())
            return await aiohttp_client(LeavesConsulFirst(app, port=held.port, socket_factory=held.socket_factory))

        yield start


@pytest.fixture
async def service(start_service: StartService) -> Client:
    return await start_service()
