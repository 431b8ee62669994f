"""What can go wrong with an event, sorted by what the consumer does about it.

A ``TemporaryFailure`` is about our dependencies, not the event: the event is
retried later, through the retry queues, without spending its budget for bugs.
An ``UnprocessableEvent`` will fail the same way every time: it goes to the
dead-letter queue at once. Anything else is unexpected (a bug): the event is
delivered again at once, and dead-lettered after ``FAILURE_LIMIT`` failures.
``ShuttingDown`` gives the event back to the broker, untouched.

Each ``UnprocessableEvent`` has a ``reason``: the stable code its dead letter
carries in ``x-dead-reason`` (settling.py), which ``dlq list`` shows and
``dlq replay --reason`` selects by. Not ``expired`` for an event too old:
that is what the broker writes for a message whose TTL ran out.
"""

from __future__ import annotations

from typing import ClassVar


class TemporaryFailure(Exception):
    """A dependency is down or busy: try the same event again later."""


class UserServiceUnavailable(TemporaryFailure):
    """The user-service could not tell us where to send the email."""


class MailServerUnavailable(TemporaryFailure):
    """The SMTP server refused the connection, deferred (4xx) even after retries, or refused us: it does not have it.

    Refused us: a 5xx before any recipient, or one whose enhanced status
    code is about us (policy, the mail system, routing), not the recipient.
    """


class MailOutcomeUnknown(TemporaryFailure):
    """The message went out with DATA, and no answer came back: the server may have it."""


class DatabaseUnavailable(TemporaryFailure):
    """PostgreSQL refused the connection, dropped it, cancelled the statement, or did not answer in time."""


class DeliveryInProgress(TemporaryFailure):
    """Another delivery of the same event holds the claim and has not finished."""


class ShuttingDown(Exception):
    """The service is stopping: a delivery that has not claimed its email gives its event back.

    Not a ``TemporaryFailure``: nothing is wrong with the event or our
    dependencies, and it spends none of the event's retries.
    """


class UnprocessableEvent(Exception):
    """The event can never be handled as it is; a person has to look at it."""

    reason: ClassVar[str] = "unprocessable"


class MalformedEvent(UnprocessableEvent):
    """The message is not a valid event, or its data lacks what we need."""

    reason = "malformed"


class MalformedCount(MalformedEvent):
    """A header that should hold one of our counts (x-retries, x-failures) holds something else.

    Not a copy we made: a message that is poison, whatever its event.
    """


class UnsupportedEvent(UnprocessableEvent):
    """An event type or version this service does not know."""

    reason = "unsupported"


class ExpiredEvent(UnprocessableEvent):
    """Older than the retention: the rows that would keep its handling idempotent may be gone."""

    reason = "too_old"


class MailRejected(UnprocessableEvent):
    """The SMTP server refused the message for good: a 5xx about its recipient or itself (see mailer.py)."""

    reason = "mail_rejected"
