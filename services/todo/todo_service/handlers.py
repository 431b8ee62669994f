"""HTTP handlers: parse the request, ask ``Todos``, show the todos.

Everything is scoped to the caller: the owner id comes from the verified
token, never from the request.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from mesh_common.auth import PRINCIPAL
from mesh_common.deadlines import call_deadline
from mesh_common.jwks import InvalidToken
from mesh_common.problems import read_json_object
from mesh_common.requests import REQUEST_ID

from .idempotency import IdempotentRequest
from .keys import OWNERS, TODOS
from .model import etag
from .openapi import openapi_document
from .owners import DEGRADED_HEADER, Owner
from .todos import TodoNotFound
from .validation import (
    canonical_uuid,
    parse_changes,
    parse_if_match,
    parse_list_query,
    parse_new_todo,
)


async def create_todo(request: web.Request) -> web.Response:
    owner_id = _owner_id(request)
    body = await read_json_object(request)
    new, key = parse_new_todo(body, request.headers.get("Idempotency-Key"))
    created = await request.app[TODOS].create(
        owner_id,
        new,
        correlation_id=request[REQUEST_ID],
        idempotent=IdempotentRequest.of(key, body) if key is not None else None,
    )
    response = await _todo_response(request, owner_id, created.snapshot, status=created.status)
    # Relative to the request's path (.../todos), so that it stays right behind
    # the gateway, which publishes /todos as /api/v1/todos.
    response.headers["Location"] = f"todos/{created.snapshot['id']}"
    if created.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


async def list_todos(request: web.Request) -> web.Response:
    owner_id = _owner_id(request)
    query = parse_list_query(request.query)
    # The page and the owner's name do not depend on each other: ask for both
    # at once. Without a page there is no answer to name: the lookup is
    # dropped, not left to call the user-service until the deadline.
    lookup = asyncio.ensure_future(_owner(request, owner_id))
    try:
        page = await request.app[TODOS].page(owner_id, query)
    except BaseException:
        lookup.cancel()
        raise
    owner = await lookup
    body = {"items": [_view(todo.snapshot(), owner) for todo in page.items], "next_cursor": page.next_cursor}
    return _mark_degraded(web.json_response(body), owner)


async def get_todo(request: web.Request) -> web.Response:
    owner_id = _owner_id(request)
    todo = await request.app[TODOS].get(owner_id, _todo_id(request))
    return await _todo_response(request, owner_id, todo.snapshot())


async def update_todo(request: web.Request) -> web.Response:
    owner_id = _owner_id(request)
    todo_id = _todo_id(request)
    changes = parse_changes(await read_json_object(request))
    todo = await request.app[TODOS].update(
        owner_id,
        todo_id,
        changes,
        if_match=parse_if_match(request.headers.getall("If-Match", ())),
        correlation_id=request[REQUEST_ID],
    )
    return await _todo_response(request, owner_id, todo.snapshot())


async def complete_todo(request: web.Request) -> web.Response:
    owner_id = _owner_id(request)
    todo = await request.app[TODOS].complete(
        owner_id,
        _todo_id(request),
        if_match=parse_if_match(request.headers.getall("If-Match", ())),
        correlation_id=request[REQUEST_ID],
    )
    return await _todo_response(request, owner_id, todo.snapshot())


async def reopen_todo(request: web.Request) -> web.Response:
    owner_id = _owner_id(request)
    todo = await request.app[TODOS].reopen(
        owner_id,
        _todo_id(request),
        if_match=parse_if_match(request.headers.getall("If-Match", ())),
        correlation_id=request[REQUEST_ID],
    )
    return await _todo_response(request, owner_id, todo.snapshot())


async def delete_todo(request: web.Request) -> web.Response:
    owner_id = _owner_id(request)
    await request.app[TODOS].delete(
        owner_id,
        _todo_id(request),
        if_match=parse_if_match(request.headers.getall("If-Match", ())),
        correlation_id=request[REQUEST_ID],
    )
    return web.Response(status=204)


async def get_openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


def _owner_id(request: web.Request) -> str:
    owner_id = canonical_uuid(request[PRINCIPAL].user_id)
    if owner_id is None:
        raise InvalidToken("The token's subject is not a user id")
    return owner_id


def _todo_id(request: web.Request) -> str:
    todo_id = canonical_uuid(request.match_info["todo_id"])
    if todo_id is None:
        raise TodoNotFound()  # a malformed id names no todo, like any other unknown one
    return todo_id


async def _owner(request: web.Request, owner_id: str) -> Owner:
    # Ends before the request's deadline, which no longer cuts anything once
    # a change has committed: a slow user-service costs the name, never the answer.
    return await request.app[OWNERS].lookup(
        owner_id, token=request[PRINCIPAL].token, request_id=request[REQUEST_ID], until=call_deadline(request)
    )


def _view(snapshot: dict[str, Any], owner: Owner) -> dict[str, Any]:
    view = {name: value for name, value in snapshot.items() if name != "owner_id"}
    view["owner"] = owner.to_json()
    return view


def _mark_degraded(response: web.Response, owner: Owner) -> web.Response:
    if owner.degraded:
        response.headers[DEGRADED_HEADER] = "owner"
    return response


async def _todo_response(
    request: web.Request, owner_id: str, snapshot: dict[str, Any], *, status: int = 200
) -> web.Response:
    owner = await _owner(request, owner_id)
    response = web.json_response(_view(snapshot, owner), status=status)
    response.headers["ETag"] = etag(snapshot["version"])
    return _mark_degraded(response, owner)
