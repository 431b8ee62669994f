"""Refresh tokens: opaque, stored hashed, rotated on every use.

A login starts a family. Each refresh spends the presented token and issues
its child in the same family. Presenting a spent token again can only mean
that someone kept a copy (the thief or the victim, we cannot tell), so the
whole family is revoked and both have to log in again (OAuth 2.0 Security
BCP, section 4.14).

A family is deleted whole (``prune_families``), once its last token expired.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from typing import Any, NamedTuple

import aiopg
import structlog

from mesh_common.pruning import PruneJob
from mesh_common.transactions import transaction

log = structlog.get_logger()


class RefreshTokenRejected(Exception):
    """Unknown, expired, revoked or reused; ``reason`` is for logs only."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Rotated:
    user_id: str
    refresh_token: str


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def issue(cur: Any, user_id: str, ttl: int, *, family_id: str | None = None, parent_id: str | None = None) -> str:
    """A new refresh token for ``user_id``: a new family unless ``family_id`` is given."""
    token = secrets.token_urlsafe(32)
    await cur.execute(
        "INSERT INTO refresh_tokens (token_hash, user_id, family_id, parent_id, expires_at)"
        " VALUES (%s, %s, %s, %s, now() + make_interval(secs => %s))",
        (_digest(token), user_id, family_id or str(uuid.uuid4()), parent_id, ttl),
    )
    return token


async def start_family(pool: aiopg.Pool, user_id: str, ttl: int) -> str:
    async with pool.acquire() as conn, conn.cursor() as cur:
        return await issue(cur, user_id, ttl)


class _Stored(NamedTuple):
    id: str
    user_id: str
    family_id: str
    spent: bool
    revoked: bool
    expired: bool

    @property
    def rejection(self) -> str | None:
        if self.revoked:
            return "revoked"
        if self.spent:
            return "reused"
        if self.expired:
            return "expired"
        return None


async def rotate(pool: aiopg.Pool, token: str, ttl: int) -> Rotated:
    """Spend ``token`` and return its child, or raise ``RefreshTokenRejected``."""
    async with transaction(pool) as cur:
        # FOR UPDATE: two refreshes with the same token run one after the
        # other, and the second one finds it spent.
        await cur.execute(
            "SELECT id::text, user_id::text, family_id::text, spent_at IS NOT NULL, revoked_at IS NOT NULL,"
            " expires_at <= now() FROM refresh_tokens WHERE token_hash = %s FOR UPDATE",
            (_digest(token),),
        )
        row = await cur.fetchone()
        stored = _Stored(*row) if row else None
        reason = stored.rejection if stored else "unknown"
        if stored and reason is None:
            await cur.execute("UPDATE refresh_tokens SET spent_at = now() WHERE id = %s", (stored.id,))
            child = await issue(cur, stored.user_id, ttl, family_id=stored.family_id, parent_id=stored.id)
            return Rotated(user_id=stored.user_id, refresh_token=child)
        if stored and reason == "reused":
            await _revoke(cur, stored.family_id)
            log.warning("refresh_token_reused", family_id=stored.family_id, user_id=stored.user_id)
    # Raised only after the commit, so that a reuse's revocation is kept.
    raise RefreshTokenRejected(reason or "unknown")


async def revoke_family(pool: aiopg.Pool, token: str) -> None:
    """Log out: revoke the family ``token`` belongs to (nothing if it is unknown)."""
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT family_id FROM refresh_tokens WHERE token_hash = %s", (_digest(token),))
        row = await cur.fetchone()
        if row:
            await _revoke(cur, row[0])


async def _revoke(cur: Any, family_id: Any) -> None:
    await cur.execute(
        "UPDATE refresh_tokens SET revoked_at = now() WHERE family_id = %s AND revoked_at IS NULL", (family_id,)
    )


def prune_families(retention: int) -> PruneJob:
    """Delete the families whose every token expired more than ``retention`` seconds ago.

    Never a token alone: a spent token presented again revokes its family
    even after it expired (``_Stored.rejection``), so it is kept for as long
    as any token of its family can still be refreshed. Deleting a token also
    deletes its children (``parent_id ... ON DELETE CASCADE``); a child
    expires after its parent, so the newest first puts every child of a row
    in the row's batch, and a batch deletes no more than its limit (unless
    REFRESH_TOKEN_TTL was lowered within a family's lifetime).
    """
    return PruneJob(
        "refresh_tokens",
        "DELETE FROM refresh_tokens WHERE ctid = ANY(ARRAY("
        " SELECT t.ctid FROM refresh_tokens t"
        " WHERE t.expires_at < now() - make_interval(secs => %(retention)s)"
        " AND NOT EXISTS (SELECT 1 FROM refresh_tokens live WHERE live.family_id = t.family_id"
        " AND live.expires_at >= now() - make_interval(secs => %(retention)s))"
        " ORDER BY t.expires_at DESC LIMIT %(batch)s))",
        {"retention": retention},
    )
