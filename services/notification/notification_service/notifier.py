"""One email per (event, kind), however often the event is delivered.

The steps, and what a crash after each one leaves behind:

1. Claim: insert the row as ``sending``. If it is there already and
   ``sent``, this is a redelivery: nothing to do. (When the address must be
   looked up, a cheaper check for ``sent`` comes before the lookup.)
   Crash after the claim: it goes stale after ``CLAIM_LEASE`` and a later
   delivery takes it over and sends.
2. SMTP transaction, with the Message-ID derived from (event, kind).
3. Mark the row ``sent``. Then the consumer acks the event. Crash between
   3 and the ack: the redelivered event stops at step 1. No duplicate.

The one window left is between the SMTP server's 250 (end of step 2) and
the commit of step 3: a loopback round trip to PostgreSQL, well under a
millisecond. A crash exactly there (or a connection lost while waiting for
the 250) leaves a stale claim for a message that was in fact delivered, and
the takeover sends it again. That second copy has the same Message-ID, so
mail clients that de-duplicate show one message. The alternative, never
resending a stale claim, would turn the same rare crash into a lost email
instead; we prefer a duplicate.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum

import aiopg
import structlog

from . import repository
from .directory import Recipient, UserDirectory
from .failures import DeliveryInProgress, MailRejected
from .mailer import Mailer
from .messages import compose, message_id, render

log = structlog.get_logger()

# Longer than one delivery can take (SMTP timeouts and retries included),
# so that a live delivery is never taken over; short enough that a crashed
# one is resent within a minute or so.
CLAIM_LEASE = 60.0


class Outcome(Enum):
    SENT = "sent"
    ALREADY_SENT = "already_sent"
    NO_RECIPIENT = "no_recipient"


class Notifier:
    def __init__(self, pool: aiopg.Pool, mailer: Mailer, directory: UserDirectory, *, sender: str) -> None:
        self._pool = pool
        self._mailer = mailer
        self._directory = directory
        self._sender = sender

    async def notify(
        self,
        *,
        event_id: str,
        kind: str,
        user_id: str,
        values: Mapping[str, str],
        recipient: Recipient | None = None,
    ) -> Outcome:
        """Send the ``kind`` email for ``event_id`` unless it was sent already.

        ``recipient`` is looked up from the user-service unless given.
        """
        if recipient is None:
            # Ask the user-service only about an event not handled yet.
            if await repository.notification_status(self._pool, event_id, kind) == "sent":
                log.info("notification_duplicate", event_id=event_id, kind=kind)
                return Outcome.ALREADY_SENT
            recipient = await self._directory.recipient(user_id)
            if recipient is None:
                log.info("notification_skipped", event_id=event_id, kind=kind, reason="unknown_user")
                return Outcome.NO_RECIPIENT

        msgid = message_id(event_id, kind, self._sender)
        rendered = render(kind, {"name": recipient.name, **values})
        try:
            email = compose(rendered, sender=self._sender, recipient=recipient, msgid=msgid)
        except ValueError:
            raise MailRejected("the recipient's address is not valid") from None

        claim = repository.Claim(event_id, kind, user_id, recipient.email, rendered.subject, msgid)
        if not await repository.claim_notification(self._pool, claim, lease=CLAIM_LEASE):
            if await repository.notification_status(self._pool, event_id, kind) == "sent":
                log.info("notification_duplicate", event_id=event_id, kind=kind)
                return Outcome.ALREADY_SENT
            raise DeliveryInProgress(f"{kind} for {event_id}")

        try:
            await self._mailer.send(email)
        except Exception:
            # Nothing was sent: let the next delivery claim it straight away.
            await repository.release_notification(self._pool, event_id, kind)
            raise
        await repository.mark_notification_sent(self._pool, event_id, kind)
        log.info("notification_sent", event_id=event_id, kind=kind, message_id=msgid)
        return Outcome.SENT
