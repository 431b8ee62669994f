"""The pieces on their own: parsing events and rendering emails (what SMTP answers mean: test_notification_smtp.py)."""

from __future__ import annotations

import json
from email import policy
from email.parser import BytesParser

import pytest
from aiosmtplib.email import flatten_message
from notification_support import MAIL_FROM, new_user, verification_requested

from notification_service.directory import Recipient
from notification_service.events import parse
from notification_service.failures import (
    MalformedEvent,
    UnsupportedEvent,
)
from notification_service.messages import compose, render

SENDER = MAIL_FROM


def valid_event() -> dict[str, object]:
    return json.loads(verification_requested(new_user()).to_json())


@pytest.mark.parametrize(
    ("body", "failure"),
    [
        (b"not json", MalformedEvent),
        (b"[]", MalformedEvent),
        (b"\xff\xfe", MalformedEvent),
        (json.dumps({**valid_event(), "id": "not-a-uuid"}).encode(), MalformedEvent),
        (json.dumps({k: v for k, v in valid_event().items() if k != "data"}).encode(), MalformedEvent),
        # Neither is a ValueError (an OverflowError, a RecursionError), and each
        # was retried as a bug instead of going to the DLQ.
        (json.dumps(valid_event()).encode()[:-1] + b', "version": 1e999}', MalformedEvent),  # the last one counts
        (b"[" * 100_000 + b"]" * 100_000, MalformedEvent),
        (json.dumps({**valid_event(), "version": 2}).encode(), UnsupportedEvent),
        (json.dumps({**valid_event(), "type": "todo.archived"}).encode(), UnsupportedEvent),
    ],
)
def test_events_we_cannot_handle_are_refused_not_guessed_at(body: bytes, failure: type[Exception]) -> None:
    with pytest.raises(failure):
        parse(body)


def test_a_valid_event_parses() -> None:
    event = verification_requested(new_user())
    assert parse(event.to_json()) == event


def test_a_title_with_line_breaks_cannot_break_the_subject_header() -> None:
    rendered = render("todo_completed", {"name": "Ada", "title": "Ship\r\nBcc: victim@example.test"})
    assert rendered.subject == "Done: Ship Bcc: victim@example.test"
    email = compose(rendered, sender=SENDER, recipient=Recipient("ada@example.test", "Ada"), msgid="<a@b>")
    assert "Bcc" not in email


# An RFC 2047 encoded word that decodes to line breaks: the email package
# decoded it when the header was set and wrote the breaks out as they were.
SMUGGLER = "=?utf-8?q?x=0D=0AReply-To=3A_help=40evil=2Eio=0D=0AContent-Type=3A_text/html=0D=0A=0D=0A<h1>Reset</h1>?="
NAME_SMUGGLER = "=?utf-8?q?x=0D=0AReply-To:_a@evil.io?="  # within the user-service's 64 characters


@pytest.mark.parametrize(("title", "name"), [(SMUGGLER, "Ada"), ("Ship", NAME_SMUGGLER)], ids=["title", "display name"])
def test_an_encoded_word_in_a_title_or_a_name_stays_text_in_the_email_sent(title: str, name: str) -> None:
    rendered = render("todo_completed", {"name": name, "title": title})
    email = compose(rendered, sender=SENDER, recipient=Recipient("ada@example.test", name), msgid="<a@b>")
    sent = BytesParser(policy=policy.default).parsebytes(flatten_message(email))
    assert sent.get_all("Reply-To") is None
    assert sent.get_content_type() == email.get_content_type()  # not one the title chose
    shown = {"Subject": str(sent["Subject"]), "name": sent["To"].addresses[0].display_name}
    assert [text.replace("\u200b", "") for text in shown.values()] == [f"Done: {title}", name]


# Addresses the user-service's check lets through that no email can carry,
# each refused by the email package in a different way.
@pytest.mark.parametrize(
    "address",
    [
        *("bob@example.com.", "a@b..de", "[x]@y.de", "a@", "a b@c.de", "jo..sé@example.test", "josé@x..de"),
        # An unclosed literal, which the email package trips over itself.
        "a@[1.2.3.4",
        # Comments, which the parser drops: these would reach victim@example.com.
        *("victim(1)@example.com", "victim@example.com(x)"),
    ],
)
def test_an_address_no_email_can_carry_is_a_value_error(address: str) -> None:
    # The notifier turns a ValueError into MailRejected: the DLQ at once, not a bug retried.
    rendered = render("todo_completed", {"name": "Ada", "title": "Ship it"})
    with pytest.raises(ValueError, match="not a valid address"):
        compose(rendered, sender=SENDER, recipient=Recipient(address, "Ada"), msgid="<a@b>")
