"""The SQL of a notification's claim: one row per (event, kind), from its claim to its end.

``sending`` while a delivery holds it; ``sent`` once the SMTP server took
the email; ``unconfirmed`` once it went out ``UNKNOWN_SENDS_LIMIT`` times
with no answer after DATA (see notifier.py). The last two are final.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import aiopg

from .repository import cursor

# Sends whose outcome was unknown before the email is given up on: the
# first, and the one resend that may make a duplicate of it.
UNKNOWN_SENDS_LIMIT = 2
# Names the token a claim holds once a send of its holder's has been counted.
_COUNTED = uuid.UUID("0e2b4b1c-5f0a-4c53-9d7e-5a3f6c1d8e42")


@dataclass(frozen=True, slots=True)
class Claim:
    event_id: str
    kind: str
    user_id: str
    recipient: str
    subject: str
    message_id: str


async def notification_status(pool: aiopg.Pool, event_id: str, kind: str) -> str | None:
    async with cursor(pool) as cur:
        await cur.execute("SELECT status FROM notifications WHERE event_id = %s AND kind = %s", (event_id, kind))
        row = await cur.fetchone()
    return row[0] if row else None


async def claim_notification(pool: aiopg.Pool, claim: Claim, *, lease: float) -> str | None:
    """Claim (event, kind) for sending: the claim's token, or None if it is final or held within its lease."""
    token = str(uuid.uuid4())
    async with cursor(pool) as cur:
        await cur.execute(
            """
            INSERT INTO notifications
                (event_id, kind, user_id, recipient, subject, message_id, status, claim_token)
            VALUES (%s, %s, %s, %s, %s, %s, 'sending', %s)
            ON CONFLICT (event_id, kind) DO UPDATE
                SET claimed_at = now(), claim_token = EXCLUDED.claim_token,
                    recipient = EXCLUDED.recipient, subject = EXCLUDED.subject
                WHERE notifications.status = 'sending'
                  AND notifications.claimed_at < now() - make_interval(secs => %s)
            RETURNING id
            """,
            (claim.event_id, claim.kind, claim.user_id, claim.recipient, claim.subject, claim.message_id, token, lease),
        )
        return token if await cur.fetchone() is not None else None


async def mark_notification_sent(pool: aiopg.Pool, event_id: str, kind: str) -> None:
    # Whoever holds the claim now: the email did go out, so "sent" is true,
    # and it stops a takeover that would send it yet again. True of an
    # 'unconfirmed' one too, should the 250 of a late delivery come after it.
    # The first sent_at stays. Stamped as the row is written, not when the
    # statement began (now()), which a wait for the row's lock would put
    # before rows committed meanwhile: GET /notifications pages by it.
    async with cursor(pool) as cur:
        await cur.execute(
            "UPDATE notifications SET status = 'sent', sent_at = clock_timestamp()"
            " WHERE event_id = %s AND kind = %s AND status IN ('sending', 'unconfirmed')",
            (event_id, kind),
        )


async def record_unknown_send(pool: aiopg.Pool, event_id: str, kind: str, token: str) -> bool:
    """Count a send of ours whose outcome is unknown; True if that makes the email ``unconfirmed``.

    Only with our token: a claim taken over from us is its new holder's to
    count. Counted once however often it is written: the write hands the
    claim a token derived from ours, and a write that finds that token
    already there counts nothing. A write whose answer is lost (aiopg's
    timeout closes the connection, and PostgreSQL commits it all the same)
    is made again (notifier.py): counted twice, one send with no answer
    ended the email as unconfirmed, never sent again.
    """
    counted = str(uuid.uuid5(_COUNTED, token))
    async with cursor(pool) as cur:
        await cur.execute(
            # SET reads the row as it was: the count and the token before this write.
            "UPDATE notifications SET claim_token = %(counted)s,"
            " unknown_sends = unknown_sends + CASE WHEN claim_token = %(token)s THEN 1 ELSE 0 END,"
            " status = CASE WHEN claim_token = %(token)s AND unknown_sends + 1 >= %(limit)s"
            " THEN 'unconfirmed' ELSE status END"
            " WHERE event_id = %(event_id)s AND kind = %(kind)s"
            " AND (claim_token = %(counted)s OR (claim_token = %(token)s AND status = 'sending'))"
            " RETURNING status",
            {"counted": counted, "token": token, "limit": UNKNOWN_SENDS_LIMIT, "event_id": event_id, "kind": kind},
        )
        row = await cur.fetchone()
    return row is not None and row[0] == "unconfirmed"


async def release_notification(pool: aiopg.Pool, event_id: str, kind: str, token: str) -> None:
    """Give up our claim, and only ours: after our lease, another delivery may hold it.

    A claim with an unknown send behind it is kept, to be taken over once
    its lease has run out: deleted, it would take its count with it, and
    the email could go out with no answer once more, and again after that.
    """
    async with cursor(pool) as cur:
        await cur.execute(
            "DELETE FROM notifications WHERE event_id = %s AND kind = %s AND status = 'sending'"
            " AND claim_token = %s AND unknown_sends = 0",
            (event_id, kind, token),
        )
