"""From request bodies, query strings and headers to typed values, or a 422.

Every problem in a request is reported at once, as
``errors: [{field, message}]``, so that a client can fix them in one go.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from multidict import MultiMapping

from mesh_common.cursors import LIMIT_DIGITS_MAX, InvalidCursor, decode_cursor, parse_limit, query_errors
from mesh_common.problems import ValidationFailed

from .model import DESCRIPTION_MAX, PRIORITIES, TITLE_MAX, ListQuery, NewTodo

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
QUERY_MAX = 200
# RFC 3339's date-time: a full date, a full time and a mandatory offset.
# datetime.fromisoformat alone would also take dates, local times and ISO 8601's basic format.
# Its offset's minutes run to 59: fromisoformat would read +00:99 as +01:39.
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:[0-5]\d)")


class Invalid(ValueError):
    """One field's value is unacceptable; the message says why."""


def parse_datetime(value: object) -> datetime:
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise Invalid("must be an RFC 3339 date-time with a time zone, like 2030-01-31T09:00:00Z")
    try:
        return datetime.fromisoformat(value.upper()).astimezone(UTC)
    except (ValueError, OverflowError):
        raise Invalid("is not a valid date-time") from None


def _storable(text: str) -> str:
    """``text``, if PostgreSQL can store it: no NUL, and UTF-8 (no lone surrogates).

    JSON's ``"\\u0000"`` and ``"\\ud800"`` decode to exactly these, and both
    would otherwise fail in the driver (or in hashing), as a 500.
    """
    if "\x00" in text:
        raise Invalid("must not contain NUL characters")
    try:
        text.encode()
    except UnicodeEncodeError:
        raise Invalid("must be valid Unicode text (no lone surrogates)") from None
    return text


def _title(value: object) -> str:
    if not isinstance(value, str):
        raise Invalid("must be a string")
    title = _storable(value).strip()
    if not 1 <= len(title) <= TITLE_MAX:
        raise Invalid(f"must be 1 to {TITLE_MAX} characters long")
    return title


def _description(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise Invalid("must be a string or null")
    if len(value) > DESCRIPTION_MAX:
        raise Invalid(f"must be at most {DESCRIPTION_MAX} characters long")
    return _storable(value)


def _due_at(value: object) -> datetime | None:
    return None if value is None else parse_datetime(value)


def _priority(value: object) -> str:
    if value not in PRIORITIES:
        raise Invalid(f"must be one of {', '.join(PRIORITIES)}")
    return str(value)


_FIELDS: dict[str, Callable[[Any], Any]] = {
    "title": _title,
    "description": _description,
    "due_at": _due_at,
    "priority": _priority,
}


def _error(field: str, message: str) -> dict[str, str]:
    return {"field": field, "message": message}


def _parse_fields(body: Mapping[str, Any], *, required: tuple[str, ...] = ()) -> dict[str, Any]:
    errors = [_error(name, "is not a known field") for name in sorted(body.keys() - _FIELDS.keys())]
    errors += [_error(name, "is required") for name in required if name not in body]
    values = {}
    for name, parse in _FIELDS.items():
        if name in body:
            try:
                values[name] = parse(body[name])
            except Invalid as exc:
                errors.append(_error(name, str(exc)))
    if errors:
        raise ValidationFailed("The todo is invalid", errors=errors)
    return values


def parse_new_todo(body: Mapping[str, Any], idempotency_key: str | None = None) -> tuple[NewTodo, str | None]:
    """The todo a POST creates, and its Idempotency-Key header's value; any errors of both, together."""
    errors: list[dict[str, str]] = []
    try:
        fields = _parse_fields(body, required=("title",))
    except ValidationFailed as exc:
        errors += exc.extra["errors"]
    try:
        key = parse_idempotency_key(idempotency_key)
    except ValidationFailed as exc:
        errors += exc.extra["errors"]
    if errors:
        raise ValidationFailed("The todo is invalid", errors=errors)
    return NewTodo(**fields), key


def parse_changes(body: Mapping[str, Any]) -> dict[str, Any]:
    """The fields a PATCH sets; the ones it leaves out keep their values."""
    changes = _parse_fields(body)
    if not changes:
        raise ValidationFailed("Nothing to change", errors=[_error("body", "must set at least one field")])
    return changes


def parse_list_query(query: MultiMapping[str]) -> ListQuery:
    errors = query_errors(query, _QUERY.keys())
    values = {}
    for name, (attribute, parse) in _QUERY.items():
        if name in query:
            try:
                values[attribute] = parse(query[name])
            except Invalid as exc:
                errors.append(_error(name, str(exc)))
    if errors:
        raise ValidationFailed("The query is invalid", errors=errors)
    return ListQuery(**values)


def _limit(raw: str) -> int:
    limit = parse_limit(raw)
    if limit is None:
        raise Invalid(f"must be a positive integer of at most {LIMIT_DIGITS_MAX} digits")
    return min(limit, MAX_LIMIT)  # a larger page is not an error, just not served


def _cursor(raw: str) -> tuple[datetime, str]:
    try:
        return decode_cursor(raw)
    except InvalidCursor:
        raise Invalid("is not a cursor this API gave out") from None


def _completed(raw: str) -> bool:
    if raw not in ("true", "false"):
        raise Invalid("must be true or false")
    return raw == "true"


def _search(raw: str) -> str:
    if not 1 <= len(raw) <= QUERY_MAX:
        raise Invalid(f"must be 1 to {QUERY_MAX} characters long")
    return _storable(raw)


_QUERY: dict[str, tuple[str, Callable[[str], Any]]] = {
    "limit": ("limit", _limit),
    "cursor": ("after", _cursor),
    "completed": ("completed", _completed),
    "due_before": ("due_before", parse_datetime),
    "q": ("title_contains", _search),
}


def canonical_uuid(raw: str) -> str | None:
    """The canonical form of an id, or None when it is not a UUID."""
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class IfMatch:
    """An ``If-Match`` precondition: ``*`` or a list of entity tags.

    Tags are compared weakly (``W/"3"`` matches ``"3"``): a version names the
    stored state, which is what a client means to have seen.
    """

    versions: frozenset[str] | None  # None: "*", any current version

    def matches(self, version: int) -> bool:
        return self.versions is None or str(version) in self.versions


# One member of the list (RFC 9110 §8.8.3), and the separator after it; a
# tag may hold a comma, so the list is read tag by tag, not split on commas.
_LISTED_TAG = re.compile(r'[ \t]*(?:W/)?"([\x21\x23-\x7e\x80-\xff]*)"[ \t]*(?:,|$)')


def parse_if_match(lines: Sequence[str]) -> IfMatch | None:
    """The If-Match header from all its lines, which RFC 9110 reads as one list.

    A tag that is not one (``3`` for ``"3"``) is refused: read as matching
    nothing, it made a 412 that a client, fetching the todo and sending the
    same again, met for ever.
    """
    if not lines:
        return None
    header = ",".join(lines)
    if header.strip() == "*":
        return IfMatch(None)
    versions, at = set(), _past_empty_members(header, 0)
    while at < len(header):
        if (tag := _LISTED_TAG.match(header, at)) is None:
            break
        versions.add(tag.group(1))
        at = _past_empty_members(header, tag.end())
    # Nor is an empty one, which a client sends that fills in an ETag it does not have yet.
    if at < len(header) or not versions:
        raise ValidationFailed(
            "The If-Match header is invalid",
            errors=[_error("If-Match", 'must be * or entity tags, such as W/"3" from the ETag')],
        )
    return IfMatch(frozenset(versions))


def _past_empty_members(header: str, at: int) -> int:
    # A list may have empty members ("a, , b"): RFC 9110 §5.6.1 has them skipped.
    while at < len(header) and header[at] in " \t,":
        at += 1
    return at


IDEMPOTENCY_KEY_MAX = 255
# Visible ASCII: what a header carries unchanged. Published as is in the OpenAPI document.
IDEMPOTENCY_KEY_PATTERN = rf"^[\x21-\x7e]{{1,{IDEMPOTENCY_KEY_MAX}}}$"
_IDEMPOTENCY_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)


def parse_idempotency_key(header: str | None) -> str | None:
    if header is None:
        return None
    if not _IDEMPOTENCY_KEY.fullmatch(header):
        raise ValidationFailed(
            "The Idempotency-Key header is invalid",
            errors=[_error("Idempotency-Key", f"must be 1 to {IDEMPOTENCY_KEY_MAX} visible ASCII characters")],
        )
    return header
