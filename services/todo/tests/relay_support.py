"""A broker double for the outbox relay, and a look at the outbox's rows."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import aiopg
import psycopg2.errors


class FakeBroker:
    """The robust connection, channel and exchange the relay uses, in one; ``confirm`` is what a publish does.

    A publish that returns was confirmed; one that raises was not. For what
    a real broker cannot be made to do on cue: confirm late, stall, or take
    the instance down with it.
    """

    transport = None  # aio-pika's: where the broker's blocking shows, and a double's never blocked

    def __init__(self, confirm: Callable[[aio_pika.Message], Awaitable[None]]) -> None:
        self._confirm = confirm

    async def ready(self) -> None:
        pass

    async def channel(self, **kwargs: Any) -> FakeBroker:
        return self

    async def declare_exchange(self, *args: Any, **kwargs: Any) -> FakeBroker:
        return self

    async def publish(self, message: aio_pika.Message, *args: Any, **kwargs: Any) -> None:
        await self._confirm(message)

    async def close(self) -> None:
        pass


async def outbox(db: aiopg.Pool) -> dict[str, bool]:
    """Event id -> published, for every event in the outbox."""
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT id, published_at IS NOT NULL FROM outbox")
        return {str(event_id): published for event_id, published in await cur.fetchall()}


async def all_published(db: aiopg.Pool) -> bool:
    return all((await outbox(db)).values())


async def unsent(db: aiopg.Pool) -> set[str]:
    """The ids of the outbox's rows not marked sent."""
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT id::text FROM outbox WHERE published_at IS NULL")
        return {event_id for (event_id,) in await cur.fetchall()}


async def locked(db: aiopg.Pool, event_id: str) -> bool:
    """Whether some transaction holds the outbox row: a relay's claim."""
    async with db.acquire() as conn, conn.cursor() as cur:
        try:
            await cur.execute("SELECT 1 FROM outbox WHERE id = %s FOR UPDATE NOWAIT", (event_id,))
        except psycopg2.errors.LockNotAvailable:
            return True
        return False
