"""What the user-service publishes. Contracts: docs/services/user.md, docs/asyncapi.yaml.

All version 1, through the transactional outbox:

- ``user.registered``, once per new account; ``data`` holds user_id,
  username, email, display_name.
- ``user.email_verification_requested``, whenever a code is issued (an
  account created, its address changed, a code asked for again); ``data``
  adds the code (``token``), its ``expires_at`` and the ``reason``. The
  notification-service mails the code to ``email``. The code is a secret:
  event bodies are never logged.
- ``user.password_changed``, in the transaction that stores a new password
  (and so ends every session); ``data`` holds user_id, username,
  display_name, and the account's email and email_verified as they were
  then. The notification-service tells the owner at that address, if it was
  verified: if it was not them, they learn that their account is no longer
  theirs alone.
- ``user.email_changed``, in the transaction that sets a new address; ``data``
  holds what ``user.password_changed`` does, of the account as it was
  before: the old address, and whether it was verified. The notification-
  service tells the owner there: whoever has the password could otherwise
  move the account to an address of theirs first, and every notice after
  it, the password's included, would go to them.

Both notices add ``last_verified_email`` while the address is unverified and
the account proved another before: the owner is told there instead.
"""

from __future__ import annotations

from typing import Any, Literal

from mesh_common.events import Event

from .repository import User
from .verification import Issued

USER_REGISTERED = "user.registered"
EMAIL_VERIFICATION_REQUESTED = "user.email_verification_requested"
PASSWORD_CHANGED = "user.password_changed"
EMAIL_CHANGED = "user.email_changed"
Reason = Literal["registered", "email_changed", "requested"]


def user_registered(user: User, *, correlation_id: str) -> Event:
    return Event(
        type=USER_REGISTERED,
        user_id=user.id,
        data={
            "user_id": user.id,
            "username": user.username,
            "email": user.email,
            "display_name": user.display_name,
        },
        correlation_id=correlation_id,
    )


def email_verification_requested(user: User, issued: Issued, reason: Reason, *, correlation_id: str) -> Event:
    return Event(
        type=EMAIL_VERIFICATION_REQUESTED,
        user_id=user.id,
        data={
            "user_id": user.id,
            "username": user.username,
            "display_name": user.display_name,
            # The address the code proves, which the mail goes to: the
            # account's own when it was issued.
            "email": issued.email,
            "token": issued.token,
            "expires_at": issued.expires_at_iso(),
            "reason": reason,
        },
        correlation_id=correlation_id,
    )


def password_changed(user: User, *, correlation_id: str) -> Event:
    return _security_notice(PASSWORD_CHANGED, user, correlation_id=correlation_id)


def email_changed(before: User, *, correlation_id: str) -> Event:
    """To the address ``before`` the change, whose owner may not have made it."""
    return _security_notice(EMAIL_CHANGED, before, correlation_id=correlation_id)


def _security_notice(event_type: str, user: User, *, correlation_id: str) -> Event:
    data: dict[str, Any] = {
        "user_id": user.id,
        "username": user.username,
        "display_name": user.display_name,
        # As they are at the change: mailed later to the address of the
        # moment, the notice could go to one whoever made it set since.
        "email": user.email,
        "email_verified": user.email_verified,
    }
    if not user.email_verified and user.last_verified_email is not None:
        # Where the owner is told while the address is unproven: it may be
        # the taker's, set after a change of case unverified the owner's.
        data["last_verified_email"] = user.last_verified_email
    return Event(type=event_type, user_id=user.id, data=data, correlation_id=correlation_id)
