"""The OpenAPI 3.1 description of this service, written by hand.

Paths are the service's own; the gateway publishes them under /api/v1 (the
document's server). Three name a server of their own: /auth/service-token,
for the other services only; the JWKS, which the gateway publishes at the
root; and /openapi.json, which only an instance serves. A test checks that
every route the app serves is described here. The schemas are in
openapi_schemas.py.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from mesh_common.openapi import problem_answer, with_shared_answers

from . import __version__
from .openapi_schemas import SCHEMAS, body, json_answer, ref
from .verification import RESEND_INTERVAL, RESENDS_PER_HOUR

_INVALID = problem_answer("VALIDATION_FAILED: the body is invalid; `errors` lists each field")
_UNAUTHORIZED = problem_answer("UNAUTHORIZED or INVALID_TOKEN: no valid access token")
_USERS_ONLY = problem_answer("FORBIDDEN: a service token, which names no user")
# For the JWKS and /openapi.json. Set on the operation, as for
# /auth/service-token, not on the path item: the test that lists the
# operations takes every key of a path item for one.
_ROOT = [{"url": "/", "description": "No /api/v1 prefix"}]

PATHS: dict[str, Any] = {
    "/users": {
        "post": {
            "operationId": "users.create",
            "summary": "Register an account",
            "security": [],
            "requestBody": body("Registration"),
            "responses": {
                "201": json_answer(
                    ref("Profile"),
                    "The new account; user.registered and user.email_verification_requested"
                    " (reason `registered`) are published",
                ),
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
                "200": json_answer(ref("Profile"), "The profile"),
                "401": _UNAUTHORIZED,
                "403": _USERS_ONLY,
                "404": problem_answer("USER_NOT_FOUND: the token's account is gone"),
            },
        },
        "patch": {
            "operationId": "users.update_me",
            "summary": "Change the caller's display name or email",
            "description": "A new email is unverified until the code mailed to it comes back; the address it"
            " replaces, if verified, is told of the change.",
            "requestBody": body("ProfileChanges"),
            "responses": {
                "200": json_answer(ref("Profile"), "The changed profile"),
                "401": _UNAUTHORIZED,
                "403": _USERS_ONLY,
                "404": problem_answer("USER_NOT_FOUND: the token's account is gone"),
                "409": problem_answer("ACCOUNT_EXISTS: another account uses this email"),
                "422": _INVALID,
            },
        },
    },
    "/users/me/password": {
        "post": {
            "operationId": "users.password",
            "summary": "Change the caller's password, proven by the current one; every session ends",
            "description": "Every refresh token of the account stops working, this device's too; the answer is a"
            " new pair, so that the device that made the change stays signed in. Access tokens already issued"
            " work until they expire. A wrong current password counts against the account's login throttle."
            " The owner is emailed a notice of the change, at the account's address once it is verified.",
            "requestBody": body("PasswordChange"),
            "responses": {
                "200": json_answer(ref("TokenPair"), "The new password is set; a new session"),
                "401": _UNAUTHORIZED,
                "403": problem_answer("INVALID_CURRENT_PASSWORD; or FORBIDDEN: a service token, which names no user"),
                "404": problem_answer("USER_NOT_FOUND: the token's account is gone"),
                "409": problem_answer("CONFLICT: the password was changed by another request meanwhile"),
                "422": _INVALID,
                "429": problem_answer("RATE_LIMITED: too many failures for this account; see Retry-After"),
                "503": problem_answer(
                    "FEATURE_UNAVAILABLE: the login throttle (Redis) is away; TOO_BUSY: no hashing slot came free"
                    " in time; see Retry-After"
                ),
            },
        }
    },
    "/users/me/sessions": {
        "delete": {
            "operationId": "users.sessions",
            "summary": "Sign out everywhere: every refresh token of the caller's account stops working",
            "description": "This device's too. Access tokens already issued work until they expire.",
            "responses": {
                "204": {"description": "Every session ended"},
                "401": _UNAUTHORIZED,
                "403": _USERS_ONLY,
                "404": problem_answer("USER_NOT_FOUND: the token's account is gone"),
            },
        }
    },
    "/users/me/email/verification": {
        "post": {
            "operationId": "users.email_verification",
            "summary": "Mail another verification code to the caller's address; earlier codes stay good",
            "description": "Publishes user.email_verification_requested (reason `requested`). Registration and an"
            " email change mail a code by themselves. Every code mailed to the current address verifies it until"
            " it expires or one of them is used.",
            "responses": {
                "202": json_answer(ref("VerificationSent"), "A code is on its way"),
                "401": _UNAUTHORIZED,
                "403": _USERS_ONLY,
                "404": problem_answer("USER_NOT_FOUND: the token's account is gone"),
                "409": problem_answer("EMAIL_ALREADY_VERIFIED: the address is verified already"),
                "429": problem_answer(
                    f"VERIFICATION_RECENTLY_SENT: a code was issued less than {RESEND_INTERVAL} s ago, or"
                    f" {RESENDS_PER_HOUR} were asked for in the last hour; see Retry-After"
                ),
            },
        }
    },
    "/users/{id}": {
        "get": {
            "operationId": "users.get",
            "summary": "A profile, for its own user or a service token with scope users:read",
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {
                "200": json_answer(ref("Profile"), "The profile"),
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
            "requestBody": body("Credentials"),
            "responses": {
                "200": json_answer(ref("TokenPair"), "Access and refresh tokens"),
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
            "requestBody": body("RefreshRequest"),
            "responses": {
                "200": json_answer(ref("TokenPair"), "A new pair; the old refresh token is spent"),
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
            "requestBody": body("RefreshRequest"),
            "responses": {
                "204": {"description": "Logged out (also for unknown tokens)"},
                "422": _INVALID,
            },
        }
    },
    "/auth/verify-email": {
        "post": {
            "operationId": "auth.verify_email",
            "summary": "Prove the account's email address with the code mailed to it",
            "description": "Needs no access token: the code is the proof. Single use.",
            "security": [],
            "requestBody": body("VerificationToken"),
            "responses": {
                "204": {"description": "Verified (also when it was verified already)"},
                # Begins with the shared answer's code: a test reads that an
                # unreadable body's 400 is documented.
                "400": problem_answer(
                    "MALFORMED_BODY: the body does not decode as its Content-Encoding or framing says;"
                    " INVALID_VERIFICATION_TOKEN: the code is unknown, expired, already used, or for an address"
                    " the account no longer has (one answer for all)"
                ),
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
            "requestBody": body("ClientCredentials"),
            "responses": {
                "200": json_answer(ref("ServiceToken"), "A service access token"),
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
            "responses": {"200": json_answer(ref("Jwks"), "The JSON Web Key Set")},
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
# answer is a 503 (a login's new session: harmless twice).
_COMMITTING = frozenset(
    {
        ("post", "/users"),
        ("patch", "/users/me"),
        ("post", "/users/me/password"),
        ("post", "/users/me/email/verification"),
        ("post", "/auth/refresh"),
        ("post", "/auth/logout"),
        ("post", "/auth/verify-email"),
    }
)


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
