"""Email verification codes, in PostgreSQL: issue one, spend one, and how long until another may be asked for.

A code is ``secrets.token_urlsafe(32)``; only its SHA-256 is stored. It
proves one address of one account (the address it was mailed to), once,
within ``VERIFICATION_TTL``. Every code mailed for the account's current
address stays good until it expires or one of them is spent: mail comes
late (greylisting holds it for minutes), and the code in a late mail must
not have been killed by the one asked for while waiting. Every function
runs on the caller's cursor, in the caller's transaction, with the event
that mails the code.

Locks: the account's ``users`` row first, then its codes, in every
transaction that takes both (a resend, an address change, a verification),
so that two side by side wait for each other rather than deadlock.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from . import repository
from .digests import sha256

VERIFICATION_TTL = 24 * 60 * 60  # seconds
# A resend within this many seconds of the last code is refused: each one
# mails a stranger's inbox if the address is not the user's own.
RESEND_INTERVAL = 60
# And at most this many asked for in a rolling hour. Below the
# notification-service's cap per account and mailbox (10 an hour by default),
# which drops what is over it for good: room under it for the registration's
# code and an address change's, which are not refused and not counted here.
RESENDS_PER_HOUR = 5
RESEND_WINDOW = 60 * 60  # seconds
MAX_TOKEN_LENGTH = 200


@dataclass(frozen=True, slots=True)
class Issued:
    # Never logged, nor stored: it travels only in the event that mails it.
    token: str
    email: str
    expires_at: datetime

    def expires_at_iso(self) -> str:
        return self.expires_at.astimezone(UTC).isoformat()


async def issue(cur: Any, user_id: str, email: str, *, requested: bool = False) -> Issued:
    """A new code for ``email``, the account's address, locked by the caller; ``requested``: a resend.

    The account's codes for ``email`` stay good. Its codes for any other
    address go, and its expired ones: so the account holds only codes of
    the last ``VERIFICATION_TTL`` for one address, at most one from the
    registration or change that set it and ``RESENDS_PER_HOUR`` resends an
    hour (121 rows with the defaults), and the table needs no pruning.
    """
    token = secrets.token_urlsafe(32)
    await cur.execute(
        "DELETE FROM email_verifications WHERE user_id = %s AND (email <> %s OR expires_at <= now())",
        (user_id, email),
    )
    await cur.execute(
        "INSERT INTO email_verifications (token_hash, user_id, email, expires_at, requested)"
        " VALUES (%s, %s, %s, now() + make_interval(secs => %s), %s) RETURNING expires_at",
        (sha256(token), user_id, email, VERIFICATION_TTL, requested),
    )
    (expires_at,) = await cur.fetchone()
    return Issued(token, email, expires_at)


async def spend(cur: Any, token: str) -> str | None:
    """Verify the address ``token`` proves; the account's id, or None when the code proves nothing.

    The code is deleted whether or not it still proves anything: single use.
    Once it has verified the address, the account's other codes go too: they
    have nothing left to prove. An address verified already keeps the time
    it was first verified at.
    """
    token_hash = sha256(token)
    # Whose code it is, read without a lock: the account is locked before
    # its code, as an address change and a resend lock them.
    await cur.execute("SELECT user_id FROM email_verifications WHERE token_hash = %s", (token_hash,))
    row = await cur.fetchone()
    if row is None:
        return None
    user_id = str(row[0])
    user = await repository.fetch_user(cur, user_id, for_update=True)
    # Read again under the lock: a change of address, or the same code sent
    # twice at once, may have taken it while this waited.
    await cur.execute(
        "DELETE FROM email_verifications WHERE token_hash = %s RETURNING email, expires_at > now()", (token_hash,)
    )
    row = await cur.fetchone()
    if row is None or user is None:
        return None
    email, live = row
    # Compared exactly: a code proves the address it was mailed to, and
    # after a change of the account's address it proves nothing.
    if not live or email != user.email:
        return None
    await cur.execute(
        # The one kept is needed no more, and is not kept longer than needed.
        "UPDATE users SET email_verified_at = coalesce(email_verified_at, now()), last_verified_email = NULL"
        " WHERE id = %s",
        (user_id,),
    )
    await cur.execute("DELETE FROM email_verifications WHERE user_id = %s", (user_id,))
    return user_id


async def resend_wait(cur: Any, user_id: str) -> int:
    """Seconds until the user may ask for another code (0: now).

    The later of: ``RESEND_INTERVAL`` after the account's last code, of
    whatever kind; and, with ``RESENDS_PER_HOUR`` asked for in the last
    hour, when the oldest of them leaves it. Spent, expired or another
    address's codes are gone, and count no more: after a verification
    there is nothing to ask for, and a new address is another mailbox.
    """
    await cur.execute(
        "SELECT ceil(extract(epoch FROM greatest("
        "(SELECT max(created_at) FROM email_verifications WHERE user_id = %(user)s)"
        " + make_interval(secs => %(interval)s),"
        " (SELECT created_at FROM email_verifications WHERE user_id = %(user)s AND requested"
        "  ORDER BY created_at DESC OFFSET %(limit)s - 1 LIMIT 1) + make_interval(secs => %(window)s)"
        ") - now()))",
        {"user": user_id, "interval": RESEND_INTERVAL, "limit": RESENDS_PER_HOUR, "window": RESEND_WINDOW},
    )
    (wait,) = await cur.fetchone()
    # Whole seconds already (ceil), so any wait left is at least 1.
    return 0 if wait is None or wait <= 0 else int(wait)
