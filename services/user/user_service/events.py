"""What the user-service publishes. Contracts: docs/services/user.md.

``user.registered`` (version 1), published once per new account through the
transactional outbox; ``data`` holds user_id, username, email, display_name.
"""

from __future__ import annotations

from mesh_common.events import Event

from .repository import User

USER_REGISTERED = "user.registered"


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
