"""Our own client's side of a streamed answer: a client may hang up, or stop reading."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import structlog
from aiohttp import web

log = structlog.get_logger()


class ClientGone(Exception):
    """Our client hung up or stopped reading mid-stream: nothing the upstream did.

    Not an ``UpstreamFailure``: it leaves the breaker as it found it.
    """

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__()
        self.response = response


async def to_client(request: web.Request, response: web.StreamResponse, write: Awaitable[object], idle: float) -> None:
    """Write to our client; a client that is gone or takes nothing for ``idle`` seconds is cut.

    Either is the client's doing, never the upstream's, so it raises ``ClientGone``.
    """
    try:
        async with asyncio.timeout(idle):
            await write
    except (ConnectionError, TimeoutError) as exc:
        log.info("client_gone_mid_stream", error=type(exc).__name__)
        hang_up(request)
        raise ClientGone(response) from None


def hang_up(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()
