"""What the relay tests share: a login, an email, the settings for a sink, and a sink of a test's own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email.message import EmailMessage
from typing import Any

from smtp_sink import SmtpSink

from notification_service.directory import Recipient
from notification_service.messages import compose, message_id, render
from notification_service.settings import SmtpSettings

SENDER = "todo-mesh <no-reply@todo-mesh.test>"
USER, PASSWORD = "todo-mesh", "correct-horse-battery-staple"
WRONG = "an-old-password-4711"


def an_email(to: str) -> EmailMessage:
    rendered = render("todo_completed", {"name": "Ada", "title": "Ship it"})
    msgid = message_id("6f1c2a52-7d0e-4a43-9a55-3d1c8c1d2b9e", "todo_completed", SENDER)
    return compose(rendered, sender=SENDER, recipient=Recipient(email=to, name="Ada"), msgid=msgid)


def settings_for(sink: SmtpSink, **changes: Any) -> SmtpSettings:
    return SmtpSettings(host="127.0.0.1", port=sink.port, mail_from=SENDER, **changes)


@asynccontextmanager
async def relay(**options: Any) -> AsyncIterator[SmtpSink]:
    """A sink of its own, for TLS from the first byte, which only takes at its start."""
    sink = SmtpSink(**options)
    try:
        await sink.start()
        yield sink
    finally:
        await sink.close()
