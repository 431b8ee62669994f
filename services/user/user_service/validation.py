"""Request bodies checked field by field: a 422 lists every problem at once.

Unknown fields are refused rather than ignored, so that a typo (``displayName``)
or a field a client hoped to set (``id``, ``password_hash``) fails loudly.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Set
from dataclasses import dataclass
from typing import Any

from mesh_common.problems import ValidationFailed

from .passwords import MAX_LENGTH, MAX_TYPED_LENGTH, Passwords, normalized
from .verification import MAX_TOKEN_LENGTH

# Matched whole: "$" alone would also match before a trailing newline.
USERNAME = re.compile(r"[A-Za-z0-9_.-]{3,32}")
# Deliberately loose: the only real check of an address is a mail reaching it.
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
MAX_EMAIL = 254
# PRECIS's width mapping (RFC 8264, 9.3): every full-width and half-width
# form to the character it stands for. They all lie in U+3000 and
# U+FF00-U+FFEF, each one character to one. Migration 0011 maps stored
# emails with the same table.
WIDTH_MAPPING = {
    code: int(mapping.split()[1], 16)
    for code in (0x3000, *range(0xFF00, 0xFFF0))
    if (mapping := unicodedata.decomposition(chr(code))).startswith(("<wide>", "<narrow>"))
}
MAX_DISPLAY_NAME = 64


class _Fields:
    """Reads a JSON object field by field and collects what is wrong."""

    def __init__(self, body: dict[str, Any], *, required: Set[str], optional: Set[str] = frozenset()) -> None:
        self.body = body
        self.errors: list[dict[str, str]] = []
        for name in sorted(body.keys() - required - optional):
            self.error(name, "is not a known field")
        for name in sorted(required - body.keys()):
            self.error(name, "is required")

    def error(self, field: str, message: str) -> None:
        self.errors.append({"field": field, "message": message})

    def string(self, name: str, *, nul: bool = False) -> str | None:
        """The field's text; None when it is absent or refused (and recorded).

        A lone surrogate (JSON ``"\\ud800"``) is always refused: it is not
        UTF-8, so the throttle key, argon2 and the token hashes cannot encode
        it. NUL is refused unless ``nul``: PostgreSQL cannot store it in text,
        but a secret that is only hashed or compared may hold it, and a
        password with one may already be registered.
        """
        if name not in self.body:
            return None
        value = self.body[name]
        if not isinstance(value, str):
            self.error(name, "must be a string")
            return None
        if not nul and "\x00" in value:
            self.error(name, "must not contain NUL characters")
            return None
        try:
            value.encode()
        except UnicodeEncodeError:
            self.error(name, "must be valid Unicode text (no lone surrogates)")
            return None
        return value

    def check(self) -> None:
        if self.errors:
            raise ValidationFailed("Some fields are invalid", errors=self.errors)


def _username(fields: _Fields) -> str:
    username = fields.string("username")
    if username is not None and not USERNAME.fullmatch(username):
        fields.error("username", "must be 3 to 32 letters, digits, '.', '_' or '-'")
    return username or ""


def _email(fields: _Fields) -> str:
    email = fields.string("email")
    if email is not None:
        email = _composed(email.strip())
        # Invisible and control characters would make an account apart from
        # the address it looks like (a zero-width space, a bidi override).
        if len(email) > MAX_EMAIL or not EMAIL.match(email) or not email.isprintable():
            fields.error("email", "must be an email address")
    return email or ""


def _composed(text: str) -> str:
    # One spelling per address, at registration, on a change and at login:
    # "é" typed as one character or as "e" and an accent is one account, and
    # so is "john@example.com" typed in full-width letters (U+FF4A...) through
    # an input method. Width first, since a half-width voiced mark composes
    # with the kana before it once it is mapped.
    return unicodedata.normalize("NFC", text.translate(WIDTH_MAPPING))


def _display_name(fields: _Fields) -> str:
    name = fields.string("display_name")
    if name is not None:
        name = name.strip()
        if not 1 <= len(name) <= MAX_DISPLAY_NAME or not name.isprintable():
            fields.error("display_name", f"must be 1 to {MAX_DISPLAY_NAME} printable characters")
    return name or ""


@dataclass(frozen=True, slots=True)
class Registration:
    username: str
    email: str
    password: str
    display_name: str


def registration(body: dict[str, Any], passwords: Passwords) -> Registration:
    fields = _Fields(body, required={"username", "email", "password"}, optional={"display_name"})
    username, email = _username(fields), _email(fields)
    display_name = _display_name(fields) if "display_name" in body else username
    password = fields.string("password", nul=True)
    if password is not None:
        weakness = passwords.weakness(password, username=username, email=email)
        if weakness:
            fields.error("password", weakness)
    fields.check()
    return Registration(username, email, password or "", display_name)


def credentials(body: dict[str, Any]) -> tuple[str, str]:
    """(login name or email, password) of a login."""
    fields = _Fields(body, required={"username", "password"})
    login = fields.string("username")
    if login is not None and not 1 <= len(login) <= MAX_EMAIL:
        fields.error("username", "must be a username or an email")
    password = _password(fields, "password")
    fields.check()
    # Spaces around a name are a slip of the keyboard, never part of it.
    return _composed((login or "").strip()), password or ""


def _password(fields: _Fields, name: str) -> str | None:
    """A password to check against a stored hash."""
    password = fields.string(name, nul=True)
    # Counted as registration counts it, once normalized: typed decomposed,
    # a password that registered may be longer than MAX_LENGTH code points.
    # Or as typed: a hash from before normalization (see Passwords.verify)
    # holds a password registration counted so, and NFKC may lengthen it
    # past MAX_LENGTH ("\ufdfa" is 18 characters).
    if password is not None and not (
        1 <= len(password) <= MAX_TYPED_LENGTH
        and (len(password) <= MAX_LENGTH or len(normalized(password)) <= MAX_LENGTH)
    ):
        fields.error(name, f"must be 1 to {MAX_LENGTH} characters long")
        return None
    return password


def password_change(body: dict[str, Any], passwords: Passwords, *, username: str, email: str) -> tuple[str, str]:
    """(current password, new password), the new one held to registration's rules."""
    fields = _Fields(body, required={"current_password", "new_password"})
    current, new = _password(fields, "current_password"), fields.string("new_password", nul=True)
    if new is not None:
        weakness = passwords.weakness(new, username=username, email=email)
        if weakness:
            fields.error("new_password", weakness)
        elif current is not None and normalized(new) == normalized(current):
            # To end the other sessions without a new password: DELETE /users/me/sessions.
            fields.error("new_password", "must differ from the current password")
    fields.check()
    return current or "", new or ""


def profile_changes(body: dict[str, Any]) -> dict[str, str]:
    fields = _Fields(body, required=frozenset(), optional={"display_name", "email"})
    changes = {}
    if "display_name" in body:
        changes["display_name"] = _display_name(fields)
    if "email" in body:
        changes["email"] = _email(fields)
    if not body:
        fields.error("", "name at least one of display_name, email")
    fields.check()
    return changes


def refresh_token(body: dict[str, Any]) -> str:
    fields = _Fields(body, required={"refresh_token"})
    token = fields.string("refresh_token", nul=True)
    if token is not None and not 1 <= len(token) <= 256:
        fields.error("refresh_token", "is not a refresh token")
    fields.check()
    return token or ""


def verification_token(body: dict[str, Any]) -> str:
    fields = _Fields(body, required={"token"})
    # Only hashed, never stored: NUL does no harm, and finds no code.
    token = fields.string("token", nul=True)
    if token is not None and len(token) > MAX_TOKEN_LENGTH:
        fields.error("token", f"must be at most {MAX_TOKEN_LENGTH} characters long")
    fields.check()
    return token or ""


def client_credentials(body: dict[str, Any]) -> tuple[str, str]:
    fields = _Fields(body, required={"client_id", "client_secret"})
    client_id, secret = fields.string("client_id", nul=True), fields.string("client_secret", nul=True)
    fields.check()
    return client_id or "", secret or ""
