"""One robust AMQP connection per app.

``connect_robust`` reconnects by itself after a broker restart and restores
channels, exchanges, queues and consumers declared through it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web

from .health import SERVICE, add_health_check

AMQP = web.AppKey("mesh.amqp", AbstractRobustConnection)


def amqp_ctx(url: str):  # type: ignore[no-untyped-def]
    @asynccontextmanager
    async def open_amqp(app: web.Application) -> AsyncIterator[None]:
        connection = await aio_pika.connect_robust(url, client_properties={"connection_name": app[SERVICE].instance_id})
        app[AMQP] = connection

        async def connected() -> None:
            if connection.is_closed:
                raise ConnectionError("AMQP connection is closed")

        add_health_check(app, "rabbitmq", connected)
        try:
            yield
        finally:
            await connection.close()

    return open_amqp
