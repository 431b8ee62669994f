"""Refresh tokens: opaque, stored hashed, rotated on every use.

A login starts a family. Each refresh spends the presented token and issues
its child in the same family. Presenting a spent token again can only mean
that someone kept a copy (the thief or the victim, we cannot tell), so the
whole family is revoked and both have to log in again (OAuth 2.0 Security
BCP, section 4.14).

A family also has an absolute end, ``refresh_session_max`` after its login:
each token carries it (``session_expires_at``, copied from its parent) and
expires no later than it, so a session refreshed for ever, or stolen and
rotated by the thief, still ends. A family from before that column has
none until its next rotation, which gives it now + the maximum (see the
migration ``0006_refresh_token_session_end``).

A family is also started under its account's *session epoch*, and every
token of it carries that epoch: a password change, or "sign out
everywhere", moves the account's epoch on, and a token of an earlier one is
refused (migration ``0015_session_epoch`` says why not by revoking rows).

A family is deleted whole (``prune_families``), once its last token expired.
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass
from typing import Any, NamedTuple

import aiopg
import structlog

from mesh_common.pruning import PruneJob
from mesh_common.transactions import transaction

from .digests import sha256
from .settings import TokenPolicy

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


async def issue(
    cur: Any,
    user_id: str,
    policy: TokenPolicy,
    epoch: int,
    *,
    family_id: str | None = None,
    parent_id: str | None = None,
) -> str:
    """A new refresh token for ``user_id`` under session ``epoch``: a new family unless ``family_id`` is given.

    It ends with its parent's session, or (a root, or the child of a token
    from before session ends were stored) one starting now.
    """
    token = secrets.token_urlsafe(32)
    await cur.execute(
        "INSERT INTO refresh_tokens"
        " (token_hash, user_id, family_id, parent_id, session_epoch, session_expires_at, expires_at)"
        " SELECT %(hash)s, %(user)s::uuid, %(family)s::uuid, %(parent)s::uuid, %(epoch)s, session.ends,"
        " LEAST(now() + make_interval(secs => %(ttl)s), session.ends)"
        " FROM (SELECT COALESCE((SELECT session_expires_at FROM refresh_tokens WHERE id = %(parent)s::uuid),"
        " now() + make_interval(secs => %(max)s)) AS ends) AS session",
        {
            "hash": sha256(token),
            "user": user_id,
            "family": family_id or str(uuid.uuid4()),
            "parent": parent_id,
            "epoch": epoch,
            "ttl": policy.refresh_ttl,
            "max": policy.refresh_session_max,
        },
    )
    return token


async def start_family(pool: aiopg.Pool, user_id: str, policy: TokenPolicy, epoch: int) -> str:
    """A new session for ``user_id``, under the ``epoch`` read with the password that proved it."""
    async with pool.acquire() as conn, conn.cursor() as cur:
        return await issue(cur, user_id, policy, epoch)


class _Stored(NamedTuple):
    id: str
    user_id: str
    family_id: str
    epoch: int
    spent: bool
    revoked: bool
    signed_out: bool  # the account's epoch moved on since the family started
    expired: bool
    session_ended: bool

    @property
    def rejection(self) -> str | None:
        if self.revoked:
            return "revoked"
        # Before a reuse: the family is over already, there is nothing to revoke.
        if self.signed_out:
            return "signed_out"
        if self.spent:
            return "reused"
        # A token never outlives its session, so an ended session is also an
        # expired token; the log tells the two apart, the client cannot.
        if self.session_ended:
            return "session_expired"
        if self.expired:
            return "expired"
        return None


async def known(pool: aiopg.Pool, token: str) -> bool:
    """Whether ``token`` was issued and is still stored: one read, outside any transaction.

    Asked before a rotation or a logout takes a write slot: the two routes
    are public, and made-up tokens, from any number of addresses, would
    otherwise hold the slots that logins and registrations wait for.
    """
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT 1 FROM refresh_tokens WHERE token_hash = %s", (sha256(token),))
        return await cur.fetchone() is not None


async def rotate(pool: aiopg.Pool, token: str, policy: TokenPolicy) -> Rotated:
    """Spend ``token`` and return its child, or raise ``RefreshTokenRejected``."""
    async with transaction(pool) as cur:
        await _lock_family_of(cur, token)
        # FOR UPDATE: two refreshes with the same token run one after the
        # other, and the second one finds it spent.
        await cur.execute(
            "SELECT id::text, user_id::text, family_id::text, session_epoch, spent_at IS NOT NULL,"
            " revoked_at IS NOT NULL,"
            " session_epoch IS DISTINCT FROM (SELECT u.session_epoch FROM users u WHERE u.id = user_id),"
            " expires_at <= now(), COALESCE(session_expires_at <= now(), false)"
            " FROM refresh_tokens WHERE token_hash = %s FOR UPDATE",
            (sha256(token),),
        )
        row = await cur.fetchone()
        stored = _Stored(*row) if row else None
        reason = stored.rejection if stored else "unknown"
        if stored and reason is None:
            await cur.execute("UPDATE refresh_tokens SET spent_at = now() WHERE id = %s", (stored.id,))
            child = await issue(
                cur, stored.user_id, policy, stored.epoch, family_id=stored.family_id, parent_id=stored.id
            )
            return Rotated(user_id=stored.user_id, refresh_token=child)
        if stored and reason == "reused":
            await _revoke(cur, stored.family_id)
            log.warning("refresh_token_reused", family_id=stored.family_id, user_id=stored.user_id)
    # Raised only after the commit, so that a reuse's revocation is kept.
    raise RefreshTokenRejected(reason or "unknown")


async def revoke_family(pool: aiopg.Pool, token: str) -> None:
    """Log out: revoke the family ``token`` belongs to (nothing if it is unknown)."""
    async with transaction(pool) as cur:
        family = await _lock_family_of(cur, token)
        if family is not None:
            await _revoke(cur, family)


async def _lock_family_of(cur: Any, token: str) -> str | None:
    """Lock the family of ``token`` until the commit; its id, or None for an unknown token.

    One rotation or revocation per family at a time. Without it, a
    revocation's UPDATE, waiting on the row lock of a token being rotated,
    ran on a snapshot taken before the rotation's child existed: logout
    answered 204 and the child refreshed on for weeks. Taken before any row
    lock, by both, so the two cannot deadlock.
    """
    await cur.execute(
        "SELECT family_id::text, pg_advisory_xact_lock(hashtextextended('refresh-family:' || family_id::text, 0))"
        " FROM refresh_tokens WHERE token_hash = %s",
        (sha256(token),),
    )
    row = await cur.fetchone()
    return row[0] if row else None


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
    expires no earlier than its parent and is created after it, so the
    newest first puts every child of a row in the row's batch, and a batch
    deletes no more than its limit (unless REFRESH_TOKEN_TTL was lowered
    within a family's lifetime). "Newest" needs both columns: the tokens
    issued in a session's last REFRESH_TOKEN_TTL all expire when it ends.

    A family ends at the latest with its session (``session_expires_at``),
    so even one refreshed for ever is deleted ``retention`` seconds later.
    """
    return PruneJob(
        "refresh_tokens",
        "DELETE FROM refresh_tokens WHERE ctid = ANY(ARRAY("
        " SELECT t.ctid FROM refresh_tokens t"
        " WHERE t.expires_at < now() - make_interval(secs => %(retention)s)"
        " AND NOT EXISTS (SELECT 1 FROM refresh_tokens live WHERE live.family_id = t.family_id"
        " AND live.expires_at >= now() - make_interval(secs => %(retention)s))"
        " ORDER BY t.expires_at DESC, t.created_at DESC LIMIT %(batch)s))",
        {"retention": retention},
    )
