"""The OpenAPI 3.1 description of this service's HTTP API, served at /openapi.json."""

from __future__ import annotations

from typing import Any

from . import __version__

_PROBLEM = {"$ref": "#/components/responses/Problem"}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "todo-mesh notification-service",
        "version": __version__,
        "description": "The emails sent to the signed-in user. Published by the gateway under /api/v1.",
    },
    "security": [{"bearer": []}],
    "paths": {
        "/notifications": {
            "get": {
                "operationId": "listNotifications",
                "summary": "The signed-in user's notifications, newest first",
                "description": "Kept for EVENT_RETENTION_SECONDS (30 days) and a day after they were sent.",
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
                    },
                    {
                        "name": "cursor",
                        "in": "query",
                        "description": "The next_cursor of the previous page.",
                        "schema": {"type": "string"},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "One page of notifications",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/NotificationPage"}}},
                    },
                    "401": _PROBLEM,
                    "403": _PROBLEM,
                    "422": _PROBLEM,
                    "503": _PROBLEM,
                },
            }
        }
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        "schemas": {
            "Notification": {
                "type": "object",
                "required": ["id", "event_id", "kind", "recipient", "subject", "sent_at"],
                "properties": {
                    "id": {"type": "string", "format": "uuid"},
                    "event_id": {"type": "string", "format": "uuid", "description": "The event that caused it"},
                    "kind": {
                        "type": "string",
                        "enum": [
                            "verify_email",
                            "password_changed",
                            "email_changed",
                            "todo_completed",
                            "reminder",
                            "welcome",
                        ],
                        "description": "welcome: sent on registration before addresses were verified, no longer",
                    },
                    "recipient": {"type": "string", "format": "email"},
                    "subject": {"type": "string"},
                    "sent_at": {"type": "string", "format": "date-time"},
                },
            },
            "NotificationPage": {
                "type": "object",
                "required": ["items", "next_cursor"],
                "properties": {
                    "items": {"type": "array", "items": {"$ref": "#/components/schemas/Notification"}},
                    "next_cursor": {"type": ["string", "null"], "description": "null on the last page"},
                },
            },
            "Problem": {
                "type": "object",
                "required": ["type", "title", "status", "code"],
                "properties": {
                    "type": {"type": "string", "format": "uri"},
                    "title": {"type": "string"},
                    "status": {"type": "integer"},
                    "detail": {"type": "string"},
                    "code": {
                        "type": "string",
                        "examples": [
                            "UNAUTHORIZED",
                            "INVALID_TOKEN",
                            "FORBIDDEN",
                            "VALIDATION_FAILED",
                            "DEPENDENCY_UNAVAILABLE",
                        ],
                    },
                },
            },
        },
        "responses": {
            "Problem": {
                "description": "An RFC 9457 problem",
                "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
            }
        },
    },
}
