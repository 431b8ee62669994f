"""Emails built from the templates in ``templates/``.

Every email has a plain-text part; kinds with a ``.html`` template get an
HTML alternative too, with every value escaped. The Message-ID is derived
from the event, so that if a crash ever makes us send an email twice, both
copies carry the same id and mail clients can tell they are one message.
"""

from __future__ import annotations

import email.errors
import email.policy
import html
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.headerregistry import Address, BaseHeader, HeaderRegistry
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from functools import cache
from importlib.resources import files
from string import Template

from . import templates
from .directory import Recipient


class _HeaderClasses(HeaderRegistry):
    """The standard header registry, minus a new class for every header of every message.

    ``HeaderRegistry`` builds a class per lookup; built once per name
    instead, they make composing an email about a third cheaper.
    """

    def __init__(self) -> None:
        super().__init__()
        self._classes: dict[str, type[BaseHeader]] = {}

    def __getitem__(self, name: str) -> type[BaseHeader]:
        cls = self._classes.get(name)
        if cls is None:
            cls = self._classes[name] = super().__getitem__(name)
        return cls


POLICY = email.policy.default.clone(header_factory=_HeaderClasses())


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str
    text: str
    html: str | None


@cache
def _template(name: str) -> Template | None:
    resource = files(templates).joinpath(name)
    return Template(resource.read_text(encoding="utf-8")) if resource.is_file() else None


@cache
def _text_template(kind: str) -> tuple[Template, Template]:
    template = _template(f"{kind}.txt")
    if template is None:
        raise LookupError(f"no template for {kind!r}")
    head, _, body = template.template.partition("\n\n")
    return Template(head.removeprefix("Subject:").strip()), Template(body)


def render(kind: str, values: Mapping[str, str]) -> Rendered:
    subject, body = _text_template(kind)
    html_template = _template(f"{kind}.html")
    return Rendered(
        # A header cannot hold a line break: a title with one must not end
        # the Subject line early.
        subject=" ".join(subject.substitute(values).split()),
        text=body.substitute(values),
        html=html_template.substitute({k: html.escape(v) for k, v in values.items()}) if html_template else None,
    )


def message_id(event_id: str, kind: str, sender: str) -> str:
    # The compact form of the id keeps the header on one line: SMTP's 78
    # columns would otherwise fold it, which some parsers handle badly.
    domain = parseaddr(sender)[1].rpartition("@")[2] or "todo-mesh.local"
    return f"<{uuid.UUID(event_id).hex}.{kind}@{domain}>"


def compose(rendered: Rendered, *, sender: str, recipient: Recipient, msgid: str) -> EmailMessage:
    """The email; ``ValueError`` if the recipient's address cannot be written in one."""
    message = EmailMessage(policy=POLICY)
    message["From"] = sender
    try:
        message["To"] = _address(_literal(recipient.name), recipient.email)
    # The email package refuses an address in several ways, not all of them
    # ValueErrors ("a@b..de" is a HeaderParseError, "a@" an IndexError, and
    # "a@[1.2.3.4" an AttributeError from inside it); every one is about this
    # address, and would fail the same way every time.
    except (ValueError, IndexError, AttributeError, email.errors.MessageError) as exc:
        raise ValueError(f"not a valid address: {recipient.email!r}") from exc
    message["Subject"] = _literal(rendered.subject)
    message["Date"] = format_datetime(datetime.now(UTC))
    message["Message-ID"] = msgid
    # RFC 3834: an automatic message; out-of-office replies should not answer it.
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(rendered.text)
    if rendered.html is not None:
        message.add_alternative(rendered.html, subtype="html")
    return message


def _literal(text: str) -> str:
    """``text`` for a header, where it can never be read as RFC 2047 encoded words.

    The email package decodes "=?utf-8?q?...?=" when a header is set, and
    Python 3.11.7 writes out what it decoded as it is, line breaks included:
    a todo title or a display name could add headers to the email, or a
    whole body of its own (CVE-2024-6923). A zero-width space after each "="
    that opens such a word keeps it text, shown as it was typed.
    """
    return text.replace("=?", "=\u200b?")


def _address(name: str, addr_spec: str) -> Address:
    """The address, if an email can carry it (with SMTPUTF8 when it is not ASCII).

    RFC 6531 allows UTF-8 in the local part ("josé@example.com"). The email
    package parses one but flags it (``NonASCIILocalPartDefect``), and
    ``Address(addr_spec=...)`` raises the first flag it finds, which may hide
    a real fault. So such a local part is checked with ASCII letters in place
    of the others, and must then be a plain dot-atom: it is used as it is,
    where a quoted one would need unquoting first.
    """
    local, at, domain = addr_spec.rpartition("@")
    if local.isascii():
        address = Address(display_name=name, addr_spec=addr_spec)
        # The parser drops comments: "victim(1)@example.com" would be mailed
        # to victim@example.com, so any number of accounts to one mailbox.
        if address.addr_spec != addr_spec:
            raise ValueError("an address must be written as it is delivered")
        return address
    stand_in = "".join(c if c.isascii() else "a" for c in local)
    checked = Address(addr_spec=f"{stand_in}{at}{domain}")
    if checked.username != stand_in:
        raise ValueError("a non-ASCII local part must be a dot-atom")
    return Address(display_name=name, username=local, domain=checked.domain)
