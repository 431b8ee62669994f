"""HTTP handlers: the signed-in user's notification history."""

from __future__ import annotations

from datetime import datetime

from aiohttp import web

from mesh_common.auth import PRINCIPAL
from mesh_common.cursors import InvalidCursor, decode_cursor, encode_cursor, parse_limit, query_errors
from mesh_common.db import DB
from mesh_common.problems import DependencyUnavailable, ValidationFailed

from . import repository
from .failures import DatabaseUnavailable
from .openapi import OPENAPI

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
QUERY = frozenset({"limit", "cursor"})


async def list_notifications(request: web.Request) -> web.Response:
    """GET /notifications?limit=&cursor=: newest first, one page at a time."""
    user_id = request[PRINCIPAL].user_id
    if errors := query_errors(request.query, QUERY):
        raise ValidationFailed("The query is invalid", errors=errors)
    limit = _limit(request.query.get("limit"))
    before = _decode_cursor(request.query["cursor"]) if "cursor" in request.query else None
    # One row more than asked for tells whether there is a next page.
    try:
        rows = await repository.sent_notifications(request.app[DB], user_id, limit=limit + 1, before=before)
    except DatabaseUnavailable:
        # The consumer's name for it (retry the event later); to a client, a 503 to retry.
        raise DependencyUnavailable(headers={"Retry-After": "1"}) from None
    page = rows[:limit]
    # Keyset pagination over (sent_at, id): stable while new notifications arrive.
    next_cursor = encode_cursor(page[-1].sent_at, page[-1].id) if len(rows) > limit else None
    return web.json_response(
        {
            "items": [
                {
                    "id": n.id,
                    "event_id": n.event_id,
                    "kind": n.kind,
                    "recipient": n.recipient,
                    "subject": n.subject,
                    "sent_at": n.sent_at.isoformat(),
                }
                for n in page
            ],
            "next_cursor": next_cursor,
        }
    )


async def get_openapi(request: web.Request) -> web.Response:
    return web.json_response(OPENAPI)


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    limit = parse_limit(raw) or 0
    if not 1 <= limit <= MAX_LIMIT:
        raise ValidationFailed(
            f"limit must be an integer from 1 to {MAX_LIMIT}",
            errors=[{"field": "limit", "message": f"an integer from 1 to {MAX_LIMIT}"}],
        )
    return limit


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        return decode_cursor(cursor)
    except InvalidCursor:
        raise ValidationFailed(
            "cursor is not one this API gave out", errors=[{"field": "cursor", "message": "invalid cursor"}]
        ) from None
