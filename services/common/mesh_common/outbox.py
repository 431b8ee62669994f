"""The transactional outbox: write the event with the change, publish later.

``enqueue`` inserts into ``outbox`` on the caller's cursor, inside the
caller's transaction, so an event exists exactly when its change committed.
The relay (relay.py) publishes rows with publisher confirms and marks them sent.

Every service that publishes includes ``OUTBOX_DDL`` in a migration.
"""

from __future__ import annotations

from typing import Any

from .events import Event

OUTBOX_DDL = """
CREATE TABLE IF NOT EXISTS outbox (
    id uuid PRIMARY KEY,
    routing_key text NOT NULL,
    payload bytea NOT NULL,
    correlation_id text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX IF NOT EXISTS outbox_unpublished ON outbox (created_at) WHERE published_at IS NULL;
"""


NOTIFY_CHANNEL = "outbox"


async def enqueue(cur: Any, event: Event) -> None:
    """Add ``event`` to the outbox in the transaction ``cur`` is in.

    The NOTIFY is delivered at commit, and never on rollback, so the relay
    wakes exactly when there is something to publish.
    """
    await cur.execute(
        "INSERT INTO outbox (id, routing_key, payload, correlation_id) VALUES (%s, %s, %s, %s)",
        (event.id, event.type, event.to_json(), event.correlation_id),
    )
    await cur.execute(f"NOTIFY {NOTIFY_CHANNEL}")
