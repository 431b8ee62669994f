"""At most so many emails to one address an hour, from each account and from all of them: the recipient cap.

Anyone can set their address to someone else's (``PATCH /users/me``).
Unverified, it gets only the verification code (notifier.py), but that
once per registration, change or resend; before verification, it got
every todo notice too (some 600 a minute, only the gateway's per-user
limit in the way), every reminder, and a welcome per registration. So
every email, whatever its kind (the code too: it is the one replayed),
counts against its recipient's address, twice over:

- per account: ``NOTIFY_RECIPIENT_HOURLY_LIMIT`` in a rolling hour from one
  user id to one mailbox. Per account, not per mailbox alone: an address
  can be spelt many ways that reach one mailbox (``ada+x@`` is ``ada@``),
  and the user-service keeps only their lower case unique, so a stranger's
  account set to ``ada+x@gmail.com`` used up Ada's own budget, and her
  reminders and completions went unsent for the hour. Now it uses its own.
  A code counts against the account's other emails, but only the
  account's codes count against a code, and only its security notices
  of one kind (a changed password, a changed address) against such a
  notice (``COUNTED_APART``).
- per mailbox: ``MAILBOX_ACCOUNTS`` times that from every account together,
  which bounds what registering many accounts to one stranger's address
  can make us send (50 an hour by default), while leaving the mailbox's
  owner room for their own, and a few accounts sharing one mailbox theirs.
  A security notice, sent only to a verified address, is not held to it
  (``PAST_THE_CEILING``).

An email over either is not sent. A reminder is deferred (``CapDeferred``)
until the hour frees a slot, its claim released: it is the user's own
email, and comes due once. Any other email's claim ends as ``capped``,
final like ``sent``, so a redelivery sends nothing either; the event is
acked. Either way ``recipient_capped`` is logged, with the address's domain
and the account, never the address nor anything made from it.

Counted on the claim, in our own table, after the email is claimed and
before it is sent: ``counted_at`` marks the claims that count. A claim
released because the server does not have the email (an outage, a
refusal) takes its count with it; a claim taken over after its lease keeps
the one it had, and is not counted twice. The count and the mark are one
transaction under an advisory lock per mailbox, so that deliveries side by
side (8 per instance, and several instances) cannot each find room for one
more. The mailbox's rows of the hour (``MAILBOX_ACCOUNTS`` times the limit
at most) are read by the index on (recipient_key, counted_at), and the
account's among them by their user_id: no index of its own needed.

One address is one mailbox however it is spelt: in lower case, without a
"+tag", its domain in IDNA form (addresses.py).
"""

from __future__ import annotations

import aiopg
import structlog

from .addresses import mailbox_key
from .claims import Claim
from .failures import DeliveryInProgress
from .repository import transaction

log = structlog.get_logger()

WINDOW = 3600.0  # seconds: the rolling hour
# Of an account's emails to the mailbox, a code is held back by its codes
# alone: the account's notices of the hour, sent to the old spelling of the
# address, would otherwise drop the code for a new one (another case, a
# "+tag") for good, and each resend's too, while the user-service, whose cap
# counts codes only, answered 202. A notice is held back by all of them.
# A security notice likewise by its own kind alone: whoever changed the
# password or the address can complete todos by the dozen, and with the
# notices they cause would keep the one that tells the owner from being sent.
SECURITY_NOTICES = frozenset({"password_changed", "email_changed"})
COUNTED_APART = frozenset({"verify_email"}) | SECURITY_NOTICES
# Nor is a security notice held back by the mailbox's ceiling: accounts
# registered at spellings of the owner's address could fill its hour with
# codes. It goes only to an address verified (by whoever reads the mailbox),
# so the ceiling's stranger is not at risk, and its own count bounds it.
PAST_THE_CEILING = SECURITY_NOTICES
# The per-mailbox ceiling, as a multiple of the per-account limit: room for
# the mailbox's owner and a few accounts sharing it (a family's, a team's),
# and a bound on many accounts pointed at a stranger.
MAILBOX_ACCOUNTS = 5
# The two-key form of PostgreSQL's advisory locks, a key space of its own:
# the migrations' and the pruner's locks take one key.
_LOCK_SPACE = 0x6361_7073

_COUNT = """
WITH hour AS (
    SELECT count(*) AS counted, count(*) FILTER (WHERE mine) AS own,
           min(counted_at) AS oldest, min(counted_at) FILTER (WHERE mine) AS own_oldest
    FROM (
        SELECT counted_at, user_id = %(user_id)s AND (kind = %(kind)s OR NOT %(apart)s) AS mine
        FROM notifications
        WHERE recipient_key = %(key)s AND counted_at > now() - make_interval(secs => %(window)s)
    ) AS recent
), room AS (
    SELECT hour.*, own < %(limit)s AND (counted < %(ceiling)s OR NOT %(ceilinged)s) AS fits FROM hour
)
UPDATE notifications AS n SET
    recipient_key = %(key)s,
    counted_at = CASE WHEN n.recipient_key = %(key)s AND n.counted_at IS NOT NULL THEN n.counted_at
                      WHEN room.fits THEN now() END,
    status = CASE WHEN (n.recipient_key = %(key)s AND n.counted_at IS NOT NULL) OR room.fits OR %(defer)s
                  THEN n.status ELSE 'capped' END
FROM room
WHERE n.event_id = %(event_id)s AND n.kind = %(kind)s AND n.claim_token = %(token)s AND n.status = 'sending'
RETURNING n.counted_at IS NOT NULL, extract(epoch FROM GREATEST(
    CASE WHEN room.own >= %(limit)s THEN room.own_oldest END,
    CASE WHEN room.counted >= %(ceiling)s AND %(ceilinged)s THEN room.oldest END
) + make_interval(secs => %(window)s) - now())
"""


class CapDeferred(Exception):
    """Over the cap, and to be tried again in ``retry_after`` seconds, when the hour frees a slot: a reminder."""

    def __init__(self, reason: str, *, retry_after: float) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


async def within_cap(pool: aiopg.Pool, claim: Claim, token: str, *, limit: int, defer: bool = False) -> bool:
    """Count the claimed email against its address's hour: False if over the cap, the claim then ended as capped.

    With ``defer``, over the cap raises ``CapDeferred`` instead, the claim
    left as it was (``sending``, uncounted) for the caller to release.
    ``DeliveryInProgress`` if the claim is no longer ours (taken over): the
    next delivery decides.
    """
    key = mailbox_key(claim.recipient)
    params = {
        "key": key,
        "user_id": claim.user_id,
        "apart": claim.kind in COUNTED_APART,
        "ceilinged": claim.kind not in PAST_THE_CEILING,
        "window": WINDOW,
        "limit": limit,
        "ceiling": MAILBOX_ACCOUNTS * limit,
        "defer": defer,
        "event_id": claim.event_id,
        "kind": claim.kind,
    }
    async with transaction(pool) as cur:
        # Taken before the count, whose snapshot then sees every count made before.
        await cur.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_SPACE, key))
        await cur.execute(_COUNT, {**params, "token": token})
        row = await cur.fetchone()
    if row is None:
        raise DeliveryInProgress(f"{claim.kind} for {claim.event_id}: the claim was taken over")
    counted, frees_in = row
    if counted:
        return True
    # A slot frees when the oldest count that binds leaves the hour; a second
    # at least, should a lowered limit leave more than one to leave.
    retry_after = max(1.0, float(frees_in or 0.0))
    log.warning(
        "recipient_capped",
        event_id=claim.event_id,
        kind=claim.kind,
        recipient_domain=key.rpartition("@")[2],
        # The account, not a hash of the address: a list of likely addresses
        # reverses an unkeyed hash. The address is in our table, by event_id.
        user_id=claim.user_id,
        limit=limit,
        mailbox_limit=MAILBOX_ACCOUNTS * limit,
        window_seconds=WINDOW,
        deferred_seconds=round(retry_after) if defer else None,
    )
    if defer:
        raise CapDeferred(f"{claim.kind} for {claim.event_id}: over its recipient's cap", retry_after=retry_after)
    return False
