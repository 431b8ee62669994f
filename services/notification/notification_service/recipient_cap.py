"""At most so many emails to one address an hour, whoever asks for them: the recipient cap.

Addresses are never verified: anyone can set theirs to someone else's
(``PATCH /users/me``) and have us email that person, once per completed
todo (complete, reopen, complete again: some 600 a minute, only the
gateway's per-user limit in the way), once per reminder, and once per
welcome by registering the address again. So every email, whatever its kind
(the welcome too: it is the one replayed), counts against its recipient's
address, and one more than ``NOTIFY_RECIPIENT_HOURLY_LIMIT`` in a rolling
hour is not sent: its claim ends as ``capped``, final like ``sent``, so a
redelivery sends nothing either; the event is acked, a reminder done with,
and ``recipient_capped`` logged, with the address's domain and a hash of it,
never the address.

Counted on the claim, in our own table, after the email is claimed and
before it is sent: ``counted_at`` marks the claims that count. A claim
released because the server does not have the email (an outage, a
refusal) takes its count with it; a claim taken over after its lease keeps
the one it had, and is not counted twice. The count and the mark are one
transaction under an advisory lock per address, so that deliveries side by
side (8 per instance, and several instances) cannot each find room for one
more.

One address is one mailbox however it is spelt: in lower case, without a
"+tag", its domain in IDNA form (addresses.py).
"""

from __future__ import annotations

import hashlib

import aiopg
import structlog

from .addresses import mailbox_key
from .claims import Claim
from .failures import DeliveryInProgress
from .repository import transaction

log = structlog.get_logger()

WINDOW = 3600.0  # seconds: the rolling hour
# The two-key form of PostgreSQL's advisory locks, a key space of its own:
# the migrations' and the pruner's locks take one key.
_LOCK_SPACE = 0x6361_7073

_COUNT = """
WITH hour AS (
    SELECT count(*) AS counted FROM notifications
    WHERE recipient_key = %(key)s AND counted_at > now() - make_interval(secs => %(window)s)
)
UPDATE notifications AS n SET
    recipient_key = %(key)s,
    counted_at = CASE WHEN n.recipient_key = %(key)s AND n.counted_at IS NOT NULL THEN n.counted_at
                      WHEN hour.counted < %(limit)s THEN now() END,
    status = CASE WHEN (n.recipient_key = %(key)s AND n.counted_at IS NOT NULL) OR hour.counted < %(limit)s
                  THEN n.status ELSE 'capped' END
FROM hour
WHERE n.event_id = %(event_id)s AND n.kind = %(kind)s AND n.claim_token = %(token)s AND n.status = 'sending'
RETURNING n.status
"""


async def within_cap(pool: aiopg.Pool, claim: Claim, token: str, *, limit: int) -> bool:
    """Count the claimed email against its address's hour: False if over the cap, the claim then ended as capped.

    ``DeliveryInProgress`` if the claim is no longer ours (taken over): the
    next delivery decides.
    """
    key = mailbox_key(claim.recipient)
    params = {"key": key, "window": WINDOW, "limit": limit, "event_id": claim.event_id, "kind": claim.kind}
    async with transaction(pool) as cur:
        # Taken before the count, whose snapshot then sees every count made before.
        await cur.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_SPACE, key))
        await cur.execute(_COUNT, {**params, "token": token})
        row = await cur.fetchone()
    if row is None:
        raise DeliveryInProgress(f"{claim.kind} for {claim.event_id}: the claim was taken over")
    if row[0] == "sending":
        return True
    log.warning(
        "recipient_capped",
        event_id=claim.event_id,
        kind=claim.kind,
        recipient_domain=key.rpartition("@")[2],
        recipient_hash=hashlib.sha256(key.encode()).hexdigest()[:16],
        limit=limit,
        window_seconds=WINDOW,
    )
    return False
