"""One robust AMQP connection per app; two for an app that consumes and publishes.

``connect_robust`` reconnects by itself after a broker restart and restores
channels, exchanges, queues and consumers declared through it.

A service that only publishes through the outbox does not need the broker to
serve: with ``wait_for_broker=False`` it starts, and stays ready, while the
broker is away; the connection comes up in the background and the relay
publishes what waited in the outbox once it has.

A service that consumes publishes on a connection of its own
(``publishing=True``, under ``AMQP_PUBLISHING``). During a resource alarm
(memory above its watermark, free disk below ``disk_free_limit``) RabbitMQ
blocks each connection that publishes by no longer reading from it: a
consumer that published on the connection it consumes on would have its
acks go unread, and get no new deliveries, until the alarm cleared. A
connection that only consumes is never blocked.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractRobustConnection, FieldValue
from aiohttp import web
from yarl import URL

from .app import CleanupCtx, wait_event
from .health import SERVICE, add_health_check

AMQP = web.AppKey("mesh.amqp", AbstractRobustConnection)
AMQP_PUBLISHING = web.AppKey("mesh.amqp_publishing", AbstractRobustConnection)
# aiormq keeps the broker's connection.blocked / unblocked in this event, and
# shows it only through ``ready()``, which waits; aio-pika not at all.
_UNBLOCKED = "_Connection__connection_unblocked"
# How often a wait for a blocked connection looks again: one that reconnects
# meanwhile starts unblocked, with another event.
UNBLOCKED_CHECK_INTERVAL = 1.0


def amqp_ctx(url: str, *, wait_for_broker: bool = True, publishing: bool = False) -> CleanupCtx:
    key, role = (AMQP_PUBLISHING, "publishing") if publishing else (AMQP, "")

    @asynccontextmanager
    async def open_amqp(app: web.Application) -> AsyncIterator[None]:
        # Named after the instance (and its role): the broker's list, the management UI.
        name = " ".join(filter(None, (app[SERVICE].instance_id, role)))
        properties: dict[str, FieldValue] = {"connection_name": name}
        connecting = None
        if wait_for_broker:
            connection = await aio_pika.connect_robust(url, client_properties=properties)
        else:
            # fail_fast off: a failed first attempt is retried like a reconnection.
            connection = aio_pika.RobustConnection(URL(url), client_properties=properties, fail_fast=False)
            connecting = asyncio.create_task(connection.connect(), name="amqp-connect")
        app[key] = connection

        async def connected() -> None:
            # Not is_closed: a robust connection that lost the broker is not
            # closed, only disconnected while it tries again.
            if not connection.connected.is_set():
                raise ConnectionError("AMQP connection is down")

        # Reported either way; required only where nothing works without it:
        # an outbox lets the rest of the instance go on while it is away.
        add_health_check(app, "_".join(filter(None, ("rabbitmq", role))), connected, required=wait_for_broker)
        try:
            yield
        finally:
            if connecting is not None:
                connecting.cancel()
                await asyncio.gather(connecting, return_exceptions=True)
            await connection.close()

    return open_amqp


def blocked(connection: AbstractConnection) -> bool:
    """Whether the broker has blocked ``connection``: it published during a resource alarm.

    The broker reads nothing from it until every alarm has cleared. It
    tells a connection only once it has blocked it, so one that has not
    published since the alarm began is not blocked, and may publish once.
    """
    unblocked = _unblocked_event(connection)
    return unblocked is not None and not unblocked.is_set()


async def wait_unblocked(connection: AbstractConnection) -> None:
    """Return once ``connection`` is not ``blocked``: at once, or when the alarm clears."""
    while (unblocked := _unblocked_event(connection)) is not None and not unblocked.is_set():
        await wait_event(unblocked, UNBLOCKED_CHECK_INTERVAL)


def _unblocked_event(connection: AbstractConnection) -> asyncio.Event | None:
    """aiormq's event, set while the broker reads from the connection; None while it is not connected."""
    underlay = connection.transport
    event = getattr(underlay.connection, _UNBLOCKED, None) if underlay is not None else None
    return event if isinstance(event, asyncio.Event) else None
