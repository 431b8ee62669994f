"""The OpenAPI 3.1 description of the todo API, served at ``/openapi.json``.

Limits come from the same constants the validation uses, and the tests check
real responses against these schemas, so the document cannot drift from the
code unnoticed.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from mesh_common.cursors import LIMIT_DIGITS_MAX
from mesh_common.openapi import problem_answer, with_shared_answers

from . import __version__
from .model import DESCRIPTION_MAX, PRIORITIES, TITLE_MAX
from .validation import DEFAULT_LIMIT, IDEMPOTENCY_KEY_PATTERN, MAX_LIMIT, QUERY_MAX

_DATE_TIME = {"type": "string", "format": "date-time", "description": "RFC 3339, with a time zone"}
_NULLABLE_DATE_TIME = {"type": ["string", "null"], "format": "date-time"}
_CHANGES = ("post", "patch", "delete")


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{name}"}


def _todo_response(description: str, status_headers: tuple[str, ...] = ()) -> dict[str, Any]:
    headers = {"ETag": _ref("headers/ETag"), "X-Degraded": _ref("headers/X-Degraded")}
    headers |= {name: _ref(f"headers/{name}") for name in status_headers}
    content = {"application/json": {"schema": _ref("schemas/Todo")}}
    return {"description": description, "headers": headers, "content": content}


_NOT_FOUND = problem_answer("No todo of yours has this id (TODO_NOT_FOUND); someone else's todo answers the same")
_INVALID = problem_answer("The request is invalid (VALIDATION_FAILED, with errors: [{field, message}])")
_UNAUTHORIZED = problem_answer("No valid access token")
_FORBIDDEN = problem_answer("A service token, which names no user (FORBIDDEN)")
_PRECONDITION = problem_answer("The If-Match tag is not the todo's current one (PRECONDITION_FAILED)")
_PUBLISHED = "Published by the gateway, which adds answers of its own (429, 502-504: docs/gateway.md)"
_IDEMPOTENT = "A retry with the same key and body gets the same todo while the key is kept (a day by default)"
_TODO_ID = {"name": "todo_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
_IF_MATCH = {
    "name": "If-Match",
    "in": "header",
    "description": 'The ETag you last saw (W/"<version>"): 412 if it is stale, 422 if it is no entity tag',
    "schema": {"type": "string"},
}


def _change(summary: str, operation_id: str, ok: str, *, body: bool = False) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "operationId": operation_id,
        "parameters": [_IF_MATCH],
        "responses": {
            "200": _todo_response(ok),
            "401": _UNAUTHORIZED,
            "403": _FORBIDDEN,
            "404": _NOT_FOUND,
            "412": _PRECONDITION,
            "422": _INVALID,
        },
    }
    if body:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref("schemas/TodoChanges")}},
        }
    return operation


@cache
def openapi_document() -> dict[str, Any]:
    todo_fields = {
        "title": {"type": "string", "minLength": 1, "maxLength": TITLE_MAX},
        "description": {"type": ["string", "null"], "maxLength": DESCRIPTION_MAX},
        "due_at": {**_NULLABLE_DATE_TIME, "description": "RFC 3339, with a time zone"},
        "priority": {"enum": list(PRIORITIES), "default": "normal"},
    }
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "todo-mesh todos",
            "version": __version__,
            "description": "Each user's todos. Every operation is scoped to the caller's own todos.",
        },
        "servers": [
            {"url": "/api/v1", "description": "Published by the gateway, which adds answers of its own (429, 502-504)"}
        ],
        "security": [{"bearer": []}],
        "paths": {
            "/todos": {
                "post": {
                    "summary": "Create a todo",
                    "operationId": "createTodo",
                    "parameters": [
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "description": _IDEMPOTENT,
                            "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN},
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("schemas/NewTodo")}},
                    },
                    "responses": {
                        "201": _todo_response(
                            "Created (or replayed for a repeated Idempotency-Key)", ("Location", "Idempotent-Replayed")
                        ),
                        "401": _UNAUTHORIZED,
                        "403": _FORBIDDEN,
                        "422": problem_answer(
                            "Invalid body (VALIDATION_FAILED), or a reused key (IDEMPOTENCY_KEY_REUSED)"
                        ),
                    },
                },
                "get": {
                    "summary": "List your todos, newest first",
                    "operationId": "listTodos",
                    "parameters": [
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": 10**LIMIT_DIGITS_MAX - 1,
                                "default": DEFAULT_LIMIT,
                            },
                            "description": f"Page size; values above {MAX_LIMIT} are served as {MAX_LIMIT}",
                        },
                        {
                            "name": "cursor",
                            "in": "query",
                            "schema": {"type": "string"},
                            "description": "next_cursor of the previous page",
                        },
                        {"name": "completed", "in": "query", "schema": {"enum": ["true", "false"]}},
                        {"name": "due_before", "in": "query", "schema": _DATE_TIME},
                        {
                            "name": "q",
                            "in": "query",
                            "description": "Case-insensitive text the title contains",
                            "schema": {"type": "string", "minLength": 1, "maxLength": QUERY_MAX},
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "A page of todos",
                            "headers": {"X-Degraded": _ref("headers/X-Degraded")},
                            "content": {"application/json": {"schema": _ref("schemas/TodoPage")}},
                        },
                        "401": _UNAUTHORIZED,
                        "403": _FORBIDDEN,
                        "422": _INVALID,
                    },
                },
            },
            "/todos/{todo_id}": {
                "parameters": [_TODO_ID],
                "get": {
                    "summary": "Get one of your todos",
                    "operationId": "getTodo",
                    "responses": {
                        "200": _todo_response("The todo"),
                        "401": _UNAUTHORIZED,
                        "403": _FORBIDDEN,
                        "404": _NOT_FOUND,
                    },
                },
                "patch": _change(
                    "Change fields of a todo",
                    "updateTodo",
                    "The todo, changed (no change if it had those values)",
                    body=True,
                ),
                "delete": {
                    "summary": "Delete a todo",
                    "operationId": "deleteTodo",
                    "parameters": [_IF_MATCH],
                    "responses": {
                        "204": {"description": "Deleted"},
                        "401": _UNAUTHORIZED,
                        "403": _FORBIDDEN,
                        "404": _NOT_FOUND,
                        "412": _PRECONDITION,
                        "422": _INVALID,
                    },
                },
            },
            "/todos/{todo_id}/complete": {
                "parameters": [_TODO_ID],
                "post": _change("Mark a todo completed", "completeTodo", "The todo, completed (no change if it was)"),
            },
            "/todos/{todo_id}/reopen": {
                "parameters": [_TODO_ID],
                "post": _change("Mark a todo not completed", "reopenTodo", "The todo, open (no change if it was)"),
            },
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "headers": {
                "ETag": {"description": 'W/"<version>", for If-Match', "schema": {"type": "string"}},
                "Location": {"description": "The new todo, relative to /todos", "schema": {"type": "string"}},
                "Idempotent-Replayed": {
                    "description": "`true` when this is the answer first given to the same Idempotency-Key",
                    "schema": {"const": "true"},
                },
                "X-Degraded": {
                    "description": "`owner` when the owner's profile could not be fetched (display_name is null)",
                    "schema": {"const": "owner"},
                },
            },
            "schemas": {
                "NewTodo": {
                    "type": "object",
                    "required": ["title"],
                    "additionalProperties": False,
                    "properties": todo_fields,
                },
                "TodoChanges": {
                    "type": "object",
                    "minProperties": 1,
                    "additionalProperties": False,
                    # No default here: a field left out keeps its value, and a
                    # generated client fills a schema's default in.
                    "properties": {**todo_fields, "priority": {"enum": list(PRIORITIES)}},
                },
                "Todo": {
                    "type": "object",
                    "required": [
                        "id",
                        "title",
                        "description",
                        "due_at",
                        "priority",
                        "completed",
                        "completed_at",
                        "version",
                        "created_at",
                        "updated_at",
                        "owner",
                    ],
                    "additionalProperties": False,
                    "properties": {
                        "id": {"type": "string", "format": "uuid"},
                        **todo_fields,
                        "completed": {"type": "boolean"},
                        "completed_at": _NULLABLE_DATE_TIME,
                        "version": {"type": "integer", "minimum": 1},
                        "created_at": _DATE_TIME,
                        "updated_at": _DATE_TIME,
                        "owner": {
                            "type": "object",
                            "required": ["id", "display_name"],
                            "additionalProperties": False,
                            "properties": {
                                "id": {"type": "string", "format": "uuid"},
                                "display_name": {"type": ["string", "null"]},
                            },
                        },
                    },
                },
                "TodoPage": {
                    "type": "object",
                    "required": ["items", "next_cursor"],
                    "additionalProperties": False,
                    "properties": {
                        "items": {"type": "array", "items": _ref("schemas/Todo")},
                        "next_cursor": {"type": ["string", "null"], "description": "null on the last page"},
                    },
                },
                "Problem": {
                    "type": "object",
                    "description": "RFC 9457 problem details",
                    "required": ["type", "title", "status", "detail", "code"],
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                        "code": {"type": "string", "pattern": "^[A-Z][A-Z0-9_]*$"},
                        "errors": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["field", "message"],
                                "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                            },
                        },
                    },
                },
            },
        },
    }
    paths = document["paths"]
    document["paths"] = with_shared_answers(
        paths,
        unavailable="DEPENDENCY_UNAVAILABLE (the database, slow or away) or TOKEN_KEYS_UNAVAILABLE"
        " (tokens cannot be checked); see Retry-After",
        # Every change commits with its event (todos.py), and may lose the COMMIT's answer.
        committing=[(method, path) for path, item in paths.items() for method in item if method in _CHANGES],
    )
    return document
