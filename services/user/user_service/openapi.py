"""The OpenAPI 3.1 description of this service, written by hand.

Paths are the service's own; the gateway publishes them under /api/v1 (the
document's server). Three name a server of their own: /auth/service-token,
for the other services only; the JWKS, which the gateway publishes at the
root; and /openapi.json, which only an instance serves. A test checks that
every route the app serves is described here.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from mesh_common.openapi import problem_answer, with_shared_answers

from . import __version__
from .passwords import MAX_LENGTH, MAX_TYPED_LENGTH, MIN_LENGTH
from .validation import MAX_DISPLAY_NAME, MAX_EMAIL


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(name)}}}


def _object(properties: dict[str, Any], *, required: list[str] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    schema["required"] = list(properties) if required is None else required
    return schema


_STRING = {"type": "string"}
_INVALID = problem_answer("VALIDATION_FAILED: the body is invalid; `errors` lists each field")
_UNAUTHORIZED = problem_answer("UNAUTHORIZED or INVALID_TOKEN: no valid access token")
_USERS_ONLY = problem_answer("FORBIDDEN: a service token, which names no user")
# For the JWKS and /openapi.json. Set on the operation, as for
# /auth/service-token, not on the path item: the test that lists the
# operations takes every key of a path item for one.
_ROOT = [{"url": "/", "description": "No /api/v1 prefix"}]

SCHEMAS: dict[str, Any] = {
    "Profile": _object(
        {
            "id": {"type": "string", "format": "uuid"},
            "username": _STRING,
            "email": {"type": "string", "format": "email"},
            "display_name": _STRING,
            "created_at": {"type": "string", "format": "date-time"},
        }
    ),
    "Registration": _object(
        {
            "username": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{3,32}$"},
            "email": {"type": "string", "format": "email", "maxLength": MAX_EMAIL},
            "password": {
                "type": "string",
                "minLength": MIN_LENGTH,
                "maxLength": MAX_TYPED_LENGTH,
                "description": f"{MIN_LENGTH} to {MAX_LENGTH} characters once NFKC-normalized (as typed, up to"
                f" {MAX_TYPED_LENGTH} code points: decomposed accents count once). Refused if it is a commonly"
                " used password, or the username or email.",
            },
            "display_name": {"type": "string", "minLength": 1, "maxLength": MAX_DISPLAY_NAME},
        },
        required=["username", "email", "password"],
    ),
    "ProfileChanges": {
        **_object(
            {
                "display_name": {"type": "string", "minLength": 1, "maxLength": MAX_DISPLAY_NAME},
                "email": {"type": "string", "format": "email", "maxLength": MAX_EMAIL},
            },
            required=[],
        ),
        "minProperties": 1,
    },
    "Credentials": _object(
        {"username": {"type": "string", "description": "The username or the email"}, "password": _STRING}
    ),
    "RefreshRequest": _object({"refresh_token": _STRING}),
    "ClientCredentials": _object({"client_id": _STRING, "client_secret": _STRING}),
    "TokenPair": _object(
        {
            "access_token": {"type": "string", "description": "An EdDSA JWT (typ at+jwt)"},
            "token_type": {"const": "Bearer"},
            "expires_in": {"type": "integer", "description": "Seconds"},
            "refresh_token": {
                "type": "string",
                "description": "Opaque; single use. Lives REFRESH_TOKEN_TTL (14 days by default), never past the"
                " session's end: REFRESH_SESSION_MAX_SECONDS (30 days by default) after the login, however"
                " often it is refreshed",
            },
        }
    ),
    "ServiceToken": _object(
        {
            "access_token": _STRING,
            "token_type": {"const": "Bearer"},
            "expires_in": {"type": "integer"},
            "scope": {"const": "users:read"},
        }
    ),
    "Jwks": {"type": "object", "properties": {"keys": {"type": "array", "items": {"type": "object"}}}},
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details with a stable `code`",
        "properties": {
            "type": _STRING,
            "title": _STRING,
            "status": {"type": "integer"},
            "detail": _STRING,
            "code": _STRING,
            "errors": {
                "type": "array",
                "items": {"type": "object", "properties": {"field": _STRING, "message": _STRING}},
            },
        },
        "required": ["type", "title", "status", "code"],
    },
}

PATHS: dict[str, Any] = {
    "/users": {
        "post": {
            "operationId": "users.create",
            "summary": "Register an account",
            "security": [],
            "requestBody": _body("Registration"),
            "responses": {
                "201": _json(_ref("Profile"), "The new account; user.registered is published"),
                "409": problem_answer("ACCOUNT_EXISTS: the username or the email is taken (which one is not said)"),
                "422": _INVALID,
                "503": problem_answer("TOO_BUSY: no hashing slot came free in time; see Retry-After"),
            },
        }
    },
    "/users/me": {
        "get": {
            "operationId": "users.me",
            "summary": "The caller's profile",
            "responses": {
                "200": _json(_ref("Profile"), "The profile"),
                "401": _UNAUTHORIZED,
                "403": _USERS_ONLY,
                "404": problem_answer("USER_NOT_FOUND: the token's account is gone"),
            },
        },
        "patch": {
            "operationId": "users.update_me",
            "summary": "Change the caller's display name or email",
            "requestBody": _body("ProfileChanges"),
            "responses": {
                "200": _json(_ref("Profile"), "The changed profile"),
                "401": _UNAUTHORIZED,
                "403": _USERS_ONLY,
                "404": problem_answer("USER_NOT_FOUND: the token's account is gone"),
                "409": problem_answer("ACCOUNT_EXISTS: another account uses this email"),
                "422": _INVALID,
            },
        },
    },
    "/users/{id}": {
        "get": {
            "operationId": "users.get",
            "summary": "A profile, for its own user or a service token with scope users:read",
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {
                "200": _json(_ref("Profile"), "The profile"),
                "401": _UNAUTHORIZED,
                "403": problem_answer("FORBIDDEN: neither the user themself nor a service with users:read"),
                "404": problem_answer("USER_NOT_FOUND"),
            },
        }
    },
    "/auth/login": {
        "post": {
            "operationId": "auth.login",
            "summary": "Exchange a username (or email) and password for tokens",
            "security": [],
            "requestBody": _body("Credentials"),
            "responses": {
                "200": _json(_ref("TokenPair"), "Access and refresh tokens"),
                "401": problem_answer("INVALID_CREDENTIALS: the same answer for an unknown user and a wrong password"),
                "422": _INVALID,
                "429": problem_answer("RATE_LIMITED: too many failures for this name; see Retry-After"),
                "503": problem_answer(
                    "FEATURE_UNAVAILABLE: the login throttle (Redis) is away; TOO_BUSY: no hashing slot came free"
                    " in time; see Retry-After"
                ),
            },
        }
    },
    "/auth/refresh": {
        "post": {
            "operationId": "auth.refresh",
            "summary": "Spend a refresh token for a new pair; a reused token revokes its whole family",
            "security": [],
            "requestBody": _body("RefreshRequest"),
            "responses": {
                "200": _json(_ref("TokenPair"), "A new pair; the old refresh token is spent"),
                "401": problem_answer(
                    "INVALID_REFRESH_TOKEN: unknown, expired, spent or revoked, or its session ended"
                ),
                "422": _INVALID,
            },
        }
    },
    "/auth/logout": {
        "post": {
            "operationId": "auth.logout",
            "summary": "Revoke the refresh token's family",
            "security": [],
            "requestBody": _body("RefreshRequest"),
            "responses": {
                "204": {"description": "Logged out (also for unknown tokens)"},
                "422": _INVALID,
            },
        }
    },
    "/auth/service-token": {
        "post": {
            "operationId": "auth.service_token",
            "summary": "Client credentials for other services: a short-lived token with scope users:read",
            "description": "Internal: reached by services directly, never through the gateway (a 404 there).",
            "servers": [{"url": "/", "description": "The service itself, from another service"}],
            "security": [],
            "requestBody": _body("ClientCredentials"),
            "responses": {
                "200": _json(_ref("ServiceToken"), "A service access token"),
                "401": problem_answer("INVALID_CLIENT"),
                "422": _INVALID,
                "429": problem_answer("RATE_LIMITED: too many wrong secrets for this client from this address"),
            },
        }
    },
    "/.well-known/jwks.json": {
        "get": {
            "operationId": "jwks",
            "summary": "Public keys that verify access tokens (Ed25519, alg EdDSA)",
            "description": "Published by the gateway at this path, without /api/v1.",
            "servers": _ROOT,
            "security": [],
            "responses": {"200": _json(_ref("Jwks"), "The JSON Web Key Set")},
        }
    },
    "/openapi.json": {
        "get": {
            "operationId": "openapi",
            "summary": "This document",
            "description": "Served by an instance only; the gateway does not publish it.",
            "servers": _ROOT,
            "security": [],
            "responses": {"200": {"description": "OpenAPI 3.1"}},
        }
    },
}


# Answered from memory: every other operation reads or writes the database.
_FROM_MEMORY = frozenset({"/.well-known/jwks.json", "/openapi.json", "/auth/service-token"})
# In a transaction (mesh_common.transactions), whose COMMIT's answer may be
# lost; the rest write, if at all, one statement at a time, whose lost
# answer is a 503 (a login's new session, a profile's change: either harmless twice).
_COMMITTING = frozenset({("post", "/users"), ("post", "/auth/refresh"), ("post", "/auth/logout")})


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "todo-mesh user-service",
            "version": __version__,
            "description": "Accounts, passwords and the access tokens every todo-mesh service trusts.",
        },
        "servers": [{"url": "/api/v1", "description": "Through the gateway"}],
        "security": [{"bearer": []}],
        "paths": with_shared_answers(
            PATHS,
            unavailable="DEPENDENCY_UNAVAILABLE: the database is slow or away; see Retry-After",
            answered_from_memory=_FROM_MEMORY,
            committing=_COMMITTING,
        ),
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
    }


async def get_openapi(request: web.Request) -> web.Response:
    return web.json_response(document())
