"""One email per (event, kind), however often the event is delivered.

The steps, and what a crash after each one leaves behind:

1. Claim: insert the row as ``sending``. If it is there already and
   ``sent``, this is a redelivery: nothing to do. (When the address must be
   looked up, a cheaper check for ``sent`` comes before the lookup.)
   Crash after the claim: it goes stale after the lease and a later
   delivery takes it over and sends. Every claim and takeover has a new
   token, and a claim is released only with its own: a delivery that was
   taken over cannot delete its successor's claim.
   Before the claim, once an SMTP session is free, a caller's
   ``still_wanted`` may withdraw the email (a reminder whose todo was
   completed meanwhile): nothing is claimed, and nothing is sent. Nor is
   anything once the service is stopping (``stop``): the delivery raises
   ``ShuttingDown`` and its event goes back to the broker, rather than
   start a send that the end of the shutdown's drain could cut short in
   DATA, to be sent again after the restart.
   Once claimed, the email counts against its recipient's hourly cap
   (recipient_cap.py); over it, the claim ends as ``capped``, sent never,
   or, for a caller that defers (reminders), is released.
2. SMTP transaction, with the Message-ID derived from (event, kind).
3. Mark the row ``sent``, trying again for up to half the lease, from the
   end of the send, while the database is away. Then the consumer acks the
   event. Crash between 3 and the ack: the redelivered event stops at step
   1. No duplicate.

If step 2 fails before the message goes out (the server's 354 to DATA
comes first), or the server answers that it will not take the message,
the server does not have it: the claim is released and the next delivery
may send at once.

From the message going out until the commit of step 3, delivery is at
least once. The server's 250 may never reach us (a timeout or a dropped
connection while waiting for it: ``MailOutcomeUnknown``), or we may crash
between the 250 and the commit. Either way the claim stays: no delivery sends again while
it is within its lease, and once the lease has run out a later delivery
takes it over and sends again, a duplicate if the first copy had arrived.
The copy has the same Message-ID, so mail clients that de-duplicate show
one message. At most once would mean never resending a stale claim, and an
email lost whenever the first copy had not arrived; we prefer a duplicate.

One duplicate at most: sends with an unknown outcome are counted on the
claim, and the second one ends it as ``unconfirmed`` (``Outcome.UNCONFIRMED``),
sent no more. A server that takes the message and never answers in time
would otherwise be sent it every lease for as long as the event is retried
(a day), or, for a reminder, until the todo is due. A claim with such a send
behind it is never released, only taken over after its lease: released, its
count would go with it.

A delivery cut short (cancelled by a shutdown whose drain ran out) leaves
its claim as its send left the server, within ``CUT_SHORT_GRACE``: released
if the message had not begun to go out, counted as a send with an unknown
outcome if it had. One cut short while it records a send's outcome lets the
write under way finish. Left as they were, such claims were taken over after
their lease and the email sent again, uncounted. A broker connection
dropping does not cut a delivery short: the consumer runs them in tasks of
its own.

The lease is longer than a send can take (``Mailer.longest_send``): a
delivery still at work is not taken over. It is claimed only once it holds
one of the mailer's sessions, so that the wait for one does not count.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from enum import Enum
from typing import Any, TypeVar

import aiopg
import structlog

from . import claims, recipient_cap
from .cut_short import given_a_moment
from .directory import Recipient, UserDirectory
from .failures import DatabaseUnavailable, DeliveryInProgress, MailOutcomeUnknown, MailRejected, ShuttingDown
from .mailer import Mailer
from .messages import compose, message_id, render

log = structlog.get_logger()
T = TypeVar("T")

# Added to the mailer's longest send for the claim's lease: the database
# round trips around it. With the default SMTP settings the lease is about
# 80 s, which is how long a crashed delivery waits to be resent.
CLAIM_MARGIN = 5.0


class Outcome(Enum):
    SENT = "sent"
    ALREADY_SENT = "already_sent"
    NO_RECIPIENT = "no_recipient"
    WITHDRAWN = "withdrawn"
    # Sent claims.UNKNOWN_SENDS_LIMIT times with no answer after DATA: not sent again.
    UNCONFIRMED = "unconfirmed"
    # Over its recipient's hourly cap (recipient_cap.py): not sent, and never will be.
    CAPPED = "capped"
    # The user's address is not verified (their profile's email_verified is not true): not sent.
    UNVERIFIED = "unverified"
    # A verification code past its expiry when handled (events.py): not sent, it could not be used.
    EXPIRED = "expired"


class Notifier:
    def __init__(self, pool: aiopg.Pool, mailer: Mailer, directory: UserDirectory, *, sender: str) -> None:
        self._pool = pool
        self._mailer = mailer
        self._directory = directory
        self._sender = sender
        self.lease = mailer.longest_send + CLAIM_MARGIN
        self._recipient_limit = mailer.recipient_hourly_limit
        self._stopping = False

    def stop(self) -> None:
        """Claim nothing more: sends under way finish, and the deliveries waiting for a session give way."""
        self._stopping = True

    async def notify(
        self,
        *,
        event_id: str,
        kind: str,
        user_id: str,
        values: Mapping[str, str],
        recipient: Recipient | None = None,
        still_wanted: Callable[[], Awaitable[bool]] | None = None,
        defer_over_cap: bool = False,
    ) -> Outcome:
        """Send the ``kind`` email for ``event_id`` unless it was sent already.

        ``recipient`` is looked up from the user-service unless given, and
        then sent to only if the user-service says the address is verified.
        ``still_wanted``, if given, is asked once an SMTP session is free, just
        before the claim: the lookup and the wait for a session can take
        long, and what the email is about may have changed meanwhile.
        ``defer_over_cap``: over its recipient's cap, the claim is released
        and ``recipient_cap.CapDeferred`` raised, rather than end capped.
        """
        # A redelivery ends here, before a user lookup or the wait for a session.
        if (ended := _ended(await claims.notification_status(self._pool, event_id, kind), event_id, kind)) is not None:
            return ended
        if recipient is None:
            recipient = await self._directory.recipient(user_id)
            if recipient is None:
                log.info("notification_skipped", event_id=event_id, kind=kind, reason="unknown_user")
                return Outcome.NO_RECIPIENT
            # Read with the address: until its owner proves they read it, it gets nothing but a code.
            if not recipient.verified:
                log.info("notification_skipped", event_id=event_id, kind=kind, reason="unverified")
                return Outcome.UNVERIFIED

        msgid = message_id(event_id, kind, self._sender)
        rendered = render(kind, {"name": recipient.name, **values})
        try:
            email = compose(rendered, sender=self._sender, recipient=recipient, msgid=msgid)
        except ValueError:
            raise MailRejected("the recipient's address is not valid") from None

        claim = claims.Claim(event_id, kind, user_id, recipient.email, rendered.subject, msgid)
        # The claim's lease covers the send, not the wait for an SMTP session
        # before it: claimed earlier, a slow server's queue could outlast the
        # lease, and another instance take the claim over and send too.
        async with self._mailer.slot() as send:
            # Checked once a session is free: a shutdown's drain may well
            # have begun during the wait for one.
            if self._stopping:
                raise ShuttingDown(f"{kind} for {event_id}: not claimed, the service is stopping")
            # Asked before the claim, which it would otherwise hold for its
            # database round trips (seconds, with the database slow): past
            # the lease, another delivery could take the claim over and send.
            if still_wanted is not None and not await still_wanted():
                log.info("notification_withdrawn", event_id=event_id, kind=kind)
                return Outcome.WITHDRAWN
            token = await claims.claim_notification(self._pool, claim, lease=self.lease)
            if token is None:
                status = await claims.notification_status(self._pool, event_id, kind)
                if (ended := _ended(status, event_id, kind)) is not None:
                    return ended
                raise DeliveryInProgress(f"{kind} for {event_id}")
            try:
                limit = self._recipient_limit
                if not await recipient_cap.within_cap(self._pool, claim, token, limit=limit, defer=defer_over_cap):
                    return Outcome.CAPPED
                await send(email)
            except MailOutcomeUnknown as exc:
                unknown: MailOutcomeUnknown | None = exc  # counted below, with the session given back
            except asyncio.CancelledError:
                await self._cut_short(claim, token, body_started=send.body_started)
                raise
            except Exception:
                # Not sent (the server does not have it, counting it failed, or
                # it is deferred over the cap): the next delivery may claim it.
                await claims.release_notification(self._pool, event_id, kind, token)
                raise
            else:
                unknown = None
        if unknown is not None:
            return await self._unknown_send(unknown, claim, token)
        await self._recorded(
            functools.partial(claims.mark_notification_sent, self._pool, event_id, kind), "sent", event_id, kind
        )
        log.info("notification_sent", event_id=event_id, kind=kind, message_id=msgid)
        return Outcome.SENT

    async def _unknown_send(self, exc: MailOutcomeUnknown, claim: claims.Claim, token: str) -> Outcome:
        """The server may have the email: the claim stays, to be taken over and sent again after its lease, once."""
        event_id, kind = claim.event_id, claim.kind
        record = functools.partial(claims.record_unknown_send, self._pool, event_id, kind, token)
        if not await self._recorded(record, "unknown_send", event_id, kind):
            log.warning("notification_outcome_unknown", event_id=event_id, kind=kind, resend_after=self.lease)
            raise exc
        log.error(
            "notification_unconfirmed",
            event_id=event_id,
            kind=kind,
            message_id=claim.message_id,
            unknown_sends=claims.UNKNOWN_SENDS_LIMIT,
            detail="no answer after DATA, again: given up on, not sent any more",
        )
        return Outcome.UNCONFIRMED

    async def _cut_short(self, claim: claims.Claim, token: str, *, body_started: bool) -> None:
        """A send cancelled under way (a shutdown's drain ran out): leave the claim as the send left the server.

        Before the message began to go out (after the server's 354 to DATA)
        the server does not have the email: released, the next delivery may
        send it at once. From then on it may: counted as a send with no
        answer, so that it is sent once more at most. Left as it was, the
        claim was taken over after its lease and the email sent again.
        """
        event_id, kind = claim.event_id, claim.kind
        write: Coroutine[Any, Any, object]
        if body_started:
            write = claims.record_unknown_send(self._pool, event_id, kind, token)
        else:
            write = claims.release_notification(self._pool, event_id, kind, token)
        future = asyncio.ensure_future(write)
        written = await given_a_moment(future)
        log.warning("notification_cut_short", event_id=event_id, kind=kind, body_started=body_started, recorded=written)
        if body_started and written and future.result() is True:
            log.error("notification_unconfirmed", event_id=event_id, kind=kind, message_id=claim.message_id)

    async def _recorded(self, record: Callable[[], Awaitable[T]], what: str, event_id: str, kind: str) -> T:
        """``record``, the outcome of a send, tried again for up to half the lease while the database is away.

        The email is out, or may be. Unrecorded as sent, the claim would run
        out and a later delivery send it again; unrecorded as an unknown
        send, it could be sent more than once again. A database away for a
        moment must not make a duplicate. Away for longer, it still may; and
        so may one away when the lease runs out, which it can soon after a
        slow send (the lease runs from the claim), if another delivery of the
        event is at hand to take the claim over. Bounded from the claim
        instead, this would give up sooner, and a late record still stops a
        resend when no other delivery is at hand.

        A cancellation (a shutdown's drain ran out) does not cut an attempt
        short: cut in the middle, a write may or may not be made, and the
        count of unknown sends is no write to make twice.
        """
        delay = 0.1
        try:
            async with asyncio.timeout(self.lease / 2) as bound:
                while True:
                    attempt = asyncio.ensure_future(record())
                    try:
                        return await asyncio.shield(attempt)
                    except asyncio.CancelledError:
                        if bound.expired():  # our own bound, not a shutdown: given up on below
                            attempt.cancel()
                            raise
                        if not await given_a_moment(attempt):
                            log.error(f"notification_{what}_unrecorded", event_id=event_id, kind=kind, cut_short=True)
                        raise
                    except DatabaseUnavailable as exc:
                        event = f"notification_{what}_not_recorded_yet"
                        log.warning(event, event_id=event_id, kind=kind, error=str(exc))
                        await asyncio.sleep(delay)
                        delay = min(2 * delay, 2.0)
        except TimeoutError:
            log.error(f"notification_{what}_unrecorded", event_id=event_id, kind=kind, resend_after=self.lease)
            raise DatabaseUnavailable(f"the email went out, and could not be recorded ({what})") from None


def _ended(status: str | None, event_id: str, kind: str) -> Outcome | None:
    """What a final claim's status makes of a delivery: nothing more to send."""
    if status == "sent":
        log.info("notification_duplicate", event_id=event_id, kind=kind)
        return Outcome.ALREADY_SENT
    if status == "unconfirmed":
        log.info("notification_unconfirmed_already", event_id=event_id, kind=kind)
        return Outcome.UNCONFIRMED
    if status == "capped":
        log.info("notification_capped_already", event_id=event_id, kind=kind)
        return Outcome.CAPPED
    return None
