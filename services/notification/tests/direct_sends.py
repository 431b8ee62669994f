"""Emails sent straight through a ``Notifier`` (no broker, no user-service), and the rows they leave behind."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

import aiopg

from notification_service.directory import Recipient
from notification_service.notifier import Notifier, Outcome

ADA = {"id": "u1", "username": "ada", "email": "ada@example.test"}
# What events.py fills the verification email with.
CODE_VALUES = {"reason": "Confirm this address", "token": "c0de", "expires_at": "Tue 01 Dec 2026, 12:00 UTC"}


def verify_email(
    notifier: Notifier, event_id: str, user: dict[str, str] = ADA, **options: Any
) -> Coroutine[Any, Any, Outcome]:
    """``user``'s verification email for ``event_id``, straight through ``notifier``, their address given."""
    return notifier.notify(
        event_id=event_id,
        kind="verify_email",
        user_id=user["id"],
        values=CODE_VALUES,
        recipient=Recipient(user["email"], user["username"]),
        **options,
    )


async def claim_row(pool: aiopg.Pool, event_id: str) -> tuple[str, int] | None:
    """(status, unknown sends) of the email claimed or sent for ``event_id``; None if there is none."""
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT status, unknown_sends FROM notifications WHERE event_id = %s", (event_id,))
        row = await cur.fetchone()
    return None if row is None else (row[0], row[1])


async def notification_rows(pool: aiopg.Pool) -> list[tuple[str, str, str]]:
    """(event id, kind, status) of every email claimed or sent, oldest claim first."""
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT event_id::text, kind, status FROM notifications ORDER BY claimed_at")
        return [tuple(r) for r in await cur.fetchall()]
