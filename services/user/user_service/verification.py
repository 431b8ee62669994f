"""Email verification codes, in PostgreSQL: issue one, spend one, and when the last was issued.

A code is ``secrets.token_urlsafe(32)``; only its SHA-256 is stored. It
proves one address of one account (the address it was mailed to), once,
within ``VERIFICATION_TTL``. Every function runs on the caller's cursor, in
the caller's transaction, with the event that mails the code.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

VERIFICATION_TTL = 24 * 60 * 60  # seconds
# A resend within this many seconds of the last code is refused: each one
# mails a stranger's inbox if the address is not the user's own.
RESEND_INTERVAL = 60
MAX_TOKEN_LENGTH = 200


@dataclass(frozen=True, slots=True)
class Issued:
    # Never logged, nor stored: it travels only in the event that mails it.
    token: str
    email: str
    expires_at: datetime

    def expires_at_iso(self) -> str:
        return self.expires_at.astimezone(UTC).isoformat()


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def issue(cur: Any, user_id: str, email: str) -> Issued:
    """A new code for ``email``; the user's older codes stop working."""
    token = secrets.token_urlsafe(32)
    await cur.execute("DELETE FROM email_verifications WHERE user_id = %s", (user_id,))
    await cur.execute(
        "INSERT INTO email_verifications (token_hash, user_id, email, expires_at)"
        " VALUES (%s, %s, %s, now() + make_interval(secs => %s)) RETURNING expires_at",
        (_hash(token), user_id, email, VERIFICATION_TTL),
    )
    (expires_at,) = await cur.fetchone()
    return Issued(token, email, expires_at)


async def spend(cur: Any, token: str) -> str | None:
    """Verify the address ``token`` proves; the account's id, or None when the code proves nothing.

    The code is deleted whether or not it still proves anything: single use.
    An address verified already keeps the time it was first verified at.
    """
    await cur.execute(
        "DELETE FROM email_verifications WHERE token_hash = %s RETURNING user_id, email, expires_at > now()",
        (_hash(token),),
    )
    row = await cur.fetchone()
    if row is None:
        return None
    user_id, email, live = row
    if not live:
        return None
    # Compared exactly: a code proves the address it was mailed to, and
    # after a change of the account's address it proves nothing.
    await cur.execute(
        "UPDATE users SET email_verified_at = coalesce(email_verified_at, now()) WHERE id = %s AND email = %s",
        (user_id, email),
    )
    return str(user_id) if cur.rowcount else None


async def resend_wait(cur: Any, user_id: str) -> int:
    """Seconds until the user may have another code (0: now)."""
    await cur.execute(
        "SELECT ceil(extract(epoch FROM max(created_at) + make_interval(secs => %s) - now()))"
        " FROM email_verifications WHERE user_id = %s",
        (RESEND_INTERVAL, user_id),
    )
    (wait,) = await cur.fetchone()
    # Whole seconds already (ceil), so any wait left is at least 1.
    return 0 if wait is None or wait <= 0 else int(wait)
