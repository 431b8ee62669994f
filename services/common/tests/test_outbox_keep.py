"""An event enqueued with ``keep=False`` leaves no row once published; until then it waits like any other.

Against the real PostgreSQL, in a schema of this module's own (migrated
there from the shared outbox migrations, and dropped after), so that no
service's outbox is touched. The broker is a double: only its confirm matters.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiopg
import pytest

from devstack.config import StackConfig
from mesh_common.db import migrate
from mesh_common.events import Event
from mesh_common.outbox import OUTBOX_MIGRATIONS, enqueue
from mesh_common.relay import OutboxRelay
from mesh_common.transactions import transaction

SECRET = "a-verification-code-nobody-else-may-read"


class Broker:
    """The robust connection, channel and exchange the relay uses, in one; confirms every publish, or refuses it."""

    transport = None  # aio-pika's: where the broker's blocking shows, and a double's never blocked

    def __init__(self, *, up: bool = True) -> None:
        self.up = up
        self.published: list[str] = []

    async def ready(self) -> None:
        pass

    async def channel(self, **kwargs: Any) -> Broker:
        return self

    async def declare_exchange(self, *args: Any, **kwargs: Any) -> Broker:
        return self

    async def publish(self, message: Any, *args: Any, **kwargs: Any) -> None:
        if not self.up:
            raise ConnectionError("the broker is away")
        self.published.append(str(message.message_id))

    async def close(self) -> None:
        pass


@pytest.fixture
async def db(infra: StackConfig) -> AsyncIterator[aiopg.Pool]:
    """A pool whose sessions see only a fresh schema with the outbox in it."""
    schema = f"outbox_keep_{uuid.uuid4().hex[:12]}"
    url = infra.database_url("todo")
    async with aiopg.connect(url) as conn, conn.cursor() as cur:
        await cur.execute(f"CREATE SCHEMA {schema}")
    try:
        async with aiopg.create_pool(url, minsize=1, maxsize=2, options=f"-c search_path={schema}") as pool:
            await migrate(pool, (OUTBOX_MIGRATIONS,))
            yield pool
    finally:
        async with aiopg.connect(url) as conn, conn.cursor() as cur:
            await cur.execute(f"DROP SCHEMA {schema} CASCADE")


async def _enqueue(db: aiopg.Pool, *, keep: bool) -> Event:
    # Only the one not kept carries the secret, as a verification code's event does.
    data = {"token": SECRET} if not keep else {"id": "t1"}
    event = Event(type="user.secret", user_id="u", data=data, correlation_id="c")
    async with transaction(db) as cur:
        await enqueue(cur, event, keep=keep)
    return event


async def _rows(db: aiopg.Pool) -> dict[str, tuple[bool, bytes]]:
    """Event id -> (published, payload), for every row of the outbox."""
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT id::text, published_at IS NOT NULL, payload FROM outbox")
        return {event_id: (published, bytes(payload)) for event_id, published, payload in await cur.fetchall()}


async def test_a_published_event_not_to_be_kept_leaves_no_row_and_a_kept_one_stays_marked(db: aiopg.Pool) -> None:
    transient = await _enqueue(db, keep=False)
    kept = await _enqueue(db, keep=True)
    broker = Broker()

    assert await OutboxRelay(db, broker).publish_batch() == 2  # type: ignore[arg-type]

    assert sorted(broker.published) == sorted([transient.id, kept.id])
    rows = await _rows(db)
    assert list(rows) == [kept.id]  # kept for its retention, as before
    assert rows[kept.id][0] is True
    assert not any(SECRET.encode() in payload for _, payload in rows.values())


async def test_an_event_not_to_be_kept_stays_until_it_is_published(db: aiopg.Pool) -> None:
    # Its code must still reach its email: only publishing lets it go.
    transient = await _enqueue(db, keep=False)
    broker = Broker(up=False)
    relay = OutboxRelay(db, broker)  # type: ignore[arg-type]

    with pytest.raises(ConnectionError):
        await relay.publish_batch()
    assert await _rows(db) == {transient.id: (False, transient.to_json())}

    broker.up = True
    assert await relay.publish_batch() == 1
    assert broker.published == [transient.id]
    assert await _rows(db) == {}
