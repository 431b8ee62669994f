"""Opaque cursors for keyset pagination over ``(timestamp, id)``.

A cursor names the last item of a page; the next page starts strictly after
it in the list's order. Unlike an offset, it neither skips nor repeats rows
when items are added or deleted between two pages, provided that the rows
of one list commit in the order of their timestamps: a row stamped early and
committed late can sort into a page already read. So a row's timestamp is
taken as it is written (``clock_timestamp()``, not ``now()``, the start of
its transaction), and writers that could commit out of turn take a lock
until their commit (todo_service.repository.insert_todo). It is opaque to clients
(base64url of JSON) so that its contents may change without breaking them.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Collection
from datetime import UTC, datetime

from multidict import MultiMapping

CURSOR_MAX = 512
# int() refuses more than 4300 digits (ValueError, a 500 if unguarded); no
# page size needs more than a few.
LIMIT_DIGITS_MAX = 10


class InvalidCursor(ValueError):
    """The cursor was not made by ``encode_cursor``."""


def encode_cursor(at: datetime, item_id: str) -> str:
    raw = json.dumps([at.isoformat(), item_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The ``(timestamp, id)`` a cursor names; ``InvalidCursor`` for anything else."""
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
    at, item_id = decoded
    try:
        when = datetime.fromisoformat(at)
        if when.tzinfo is None:
            raise InvalidCursor(cursor)
        # In UTC: Python takes offsets PostgreSQL refuses (+20:00, or with
        # seconds), which reached it as they were, and came back as a 500.
        return when.astimezone(UTC), str(uuid.UUID(item_id))
    except (ValueError, OverflowError):  # OverflowError: year 1 moved before year 1
        raise InvalidCursor(cursor) from None


def parse_limit(raw: str) -> int | None:
    """A page size from a query string, or None when it is not a positive integer of a few ASCII digits.

    ``isdigit()`` alone also takes "²" and other digits that int() refuses.
    """
    if not (raw.isascii() and raw.isdigit()) or len(raw) > LIMIT_DIGITS_MAX or int(raw) < 1:
        return None
    return int(raw)


def query_errors(query: MultiMapping[str], known: Collection[str]) -> list[dict[str, str]]:
    """A list's query string checked as a whole: a parameter it does not know, or one given twice.

    Ignored, a misspelt ``limt`` answers a default page the client did not
    ask for, and of ``limit=5&limit=500`` each reader could take another.
    """
    errors = [{"field": name, "message": "is not a known parameter"} for name in sorted(set(query) - set(known))]
    repeated = [name for name in sorted(set(query)) if len(query.getall(name)) > 1]
    errors += [{"field": name, "message": "must be given once"} for name in repeated]
    return errors
