"""Opaque cursors for keyset pagination over ``(created_at, id)``.

A cursor names the last todo of a page; the next page starts strictly after
it in the list's order. Unlike an offset, it neither skips nor repeats rows
when todos are added or deleted between two pages. It is opaque to clients
(base64url of JSON) so that its contents may change without breaking them.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import datetime

from .model import Todo

CURSOR_MAX = 512


class InvalidCursor(ValueError):
    """The cursor was not made by ``encode_cursor``."""


def encode_cursor(todo: Todo) -> str:
    raw = json.dumps([todo.created_at.isoformat(), todo.id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    # Ours are about 100 characters; the bound also keeps json.loads far from
    # its recursion limit ("[[[[..." raises RecursionError, not ValueError).
    if len(cursor) > CURSOR_MAX:
        raise InvalidCursor(cursor)
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        decoded = json.loads(raw)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidCursor(cursor) from None
    # Well-formed JSON of any other shape ([..., 1] would make uuid.UUID raise
    # AttributeError) is as foreign as a malformed cursor.
    if not (isinstance(decoded, list) and len(decoded) == 2 and all(isinstance(part, str) for part in decoded)):
        raise InvalidCursor(cursor)
    created_at, todo_id = decoded
    try:
        position = (datetime.fromisoformat(created_at), str(uuid.UUID(todo_id)))
    except ValueError:
        raise InvalidCursor(cursor) from None
    if position[0].tzinfo is None:
        raise InvalidCursor(cursor)
    return position
