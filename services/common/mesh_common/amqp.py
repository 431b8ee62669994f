"""One robust AMQP connection per app.

``connect_robust`` reconnects by itself after a broker restart and restores
channels, exchanges, queues and consumers declared through it.

A service that only publishes through the outbox does not need the broker to
serve: with ``wait_for_broker=False`` it starts, and stays ready, while the
broker is away; the connection comes up in the background and the relay
publishes what waited in the outbox once it has.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aio_pika
from aio_pika.abc import AbstractRobustConnection, FieldValue
from aiohttp import web
from yarl import URL

from .app import CleanupCtx
from .health import SERVICE, add_health_check

AMQP = web.AppKey("mesh.amqp", AbstractRobustConnection)


def amqp_ctx(url: str, *, wait_for_broker: bool = True) -> CleanupCtx:
    @asynccontextmanager
    async def open_amqp(app: web.Application) -> AsyncIterator[None]:
        properties: dict[str, FieldValue] = {"connection_name": app[SERVICE].instance_id}
        connecting = None
        if wait_for_broker:
            connection = await aio_pika.connect_robust(url, client_properties=properties)
        else:
            # fail_fast off: a failed first attempt is retried like a reconnection.
            connection = aio_pika.RobustConnection(URL(url), client_properties=properties, fail_fast=False)
            connecting = asyncio.create_task(connection.connect(), name="amqp-connect")
        app[AMQP] = connection

        async def connected() -> None:
            # Not is_closed: a robust connection that lost the broker is not
            # closed, only disconnected while it tries again.
            if not connection.connected.is_set():
                raise ConnectionError("AMQP connection is down")

        # Reported either way; required only where nothing works without it:
        # an outbox lets the rest of the instance go on while it is away.
        add_health_check(app, "rabbitmq", connected, required=wait_for_broker)
        try:
            yield
        finally:
            if connecting is not None:
                connecting.cancel()
                await asyncio.gather(connecting, return_exceptions=True)
            await connection.close()

    return open_amqp
