"""The transactional outbox: write the event with the change, publish later.

``enqueue`` inserts into ``outbox`` on the caller's cursor, inside the
caller's transaction, so an event exists exactly when its change committed.
The relay (relay.py) publishes rows with publisher confirms and marks them sent;
``prune_published`` deletes them once past their retention.

Every service that publishes lists ``OUTBOX_MIGRATIONS`` after its own
migrations (see db.py), so the table is defined here once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .events import Event
from .pruning import PruneJob

OUTBOX_MIGRATIONS = Path(__file__).resolve().parent / "outbox_migrations"
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


def prune_published(retention: int) -> PruneJob:
    """Delete rows published more than ``retention`` seconds ago; unpublished rows stay whatever their age."""
    return PruneJob(
        "outbox",
        "DELETE FROM outbox WHERE ctid = ANY(ARRAY("
        " SELECT ctid FROM outbox WHERE published_at < now() - make_interval(secs => %(retention)s)"
        " LIMIT %(batch)s))",
        {"retention": retention},
    )
