"""``Idempotency-Key`` on ``POST /todos``: a retried request creates nothing new.

A key belongs to its owner. The first request with a key claims it with
``INSERT ... ON CONFLICT DO NOTHING`` inside the transaction that creates the
todo, and stores its response there too. A request with the same key waits
on the primary key until that transaction ends, then either finds the stored
response (same body: replayed) or a different request hash (a client bug:
422 ``IDEMPOTENCY_KEY_REUSED``). If the first transaction rolls back, the
key is free again and the next request claims it.

A key is kept for at least ``IDEMPOTENCY_KEY_TTL`` (a day by default), then
deleted by ``prune_expired``: a request with it after that is a new request.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from mesh_common.problems import problem
from mesh_common.pruning import PruneJob

IdempotencyKeyReused = problem(
    422, "IDEMPOTENCY_KEY_REUSED", "The Idempotency-Key was already used with a different request"
)


@dataclass(frozen=True, slots=True)
class IdempotentRequest:
    key: str
    request_hash: str

    @classmethod
    def of(cls, key: str, body: dict[str, Any]) -> IdempotentRequest:
        # Canonical JSON: the same object, however it was spaced or ordered.
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return cls(key, hashlib.sha256(canonical.encode()).hexdigest())


@dataclass(frozen=True, slots=True)
class StoredResponse:
    status: int
    body: dict[str, Any]


async def claim_key(cur: Any, owner_id: str, request: IdempotentRequest) -> bool:
    """True if this transaction now holds the key; blocks while another one does."""
    await cur.execute(
        "INSERT INTO idempotency_keys (owner_id, key, request_hash) VALUES (%s, %s, %s)"
        " ON CONFLICT (owner_id, key) DO NOTHING RETURNING true",
        (owner_id, request.key, request.request_hash),
    )
    return await cur.fetchone() is not None


async def stored_response(cur: Any, owner_id: str, request: IdempotentRequest) -> StoredResponse | None:
    """The response stored under a key claimed by a committed transaction.

    ``None`` if the key is gone: ``ON CONFLICT DO NOTHING`` locks nothing, so
    the pruner may delete an expired key between the failed claim and this
    read. The key is then free, and the caller claims it again.
    """
    await cur.execute(
        "SELECT request_hash, response_status, response_body FROM idempotency_keys WHERE owner_id = %s AND key = %s",
        (owner_id, request.key),
    )
    row = await cur.fetchone()
    if row is None:
        return None
    request_hash, status, body = row
    if request_hash != request.request_hash:
        raise IdempotencyKeyReused("This key was used for another request body; use a new key for a new request")
    return StoredResponse(status, body)


async def store_response(cur: Any, owner_id: str, request: IdempotentRequest, response: StoredResponse) -> None:
    await cur.execute(
        "UPDATE idempotency_keys SET response_status = %s, response_body = %s::jsonb WHERE owner_id = %s AND key = %s",
        (response.status, json.dumps(response.body), owner_id, request.key),
    )


def prune_expired(ttl: int) -> PruneJob:
    """Delete the keys claimed more than ``ttl`` seconds ago."""
    return PruneJob(
        "idempotency_keys",
        "DELETE FROM idempotency_keys WHERE ctid = ANY(ARRAY("
        " SELECT ctid FROM idempotency_keys WHERE created_at < now() - make_interval(secs => %(ttl)s)"
        " LIMIT %(batch)s))",
        {"ttl": ttl},
    )
