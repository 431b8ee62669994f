"""The schemas of the OpenAPI document (openapi.py), and the helpers both modules write it with."""

from __future__ import annotations

from typing import Any

from .passwords import MAX_LENGTH, MAX_TYPED_LENGTH, MIN_LENGTH
from .validation import MAX_DISPLAY_NAME, MAX_EMAIL
from .verification import MAX_TOKEN_LENGTH, VERIFICATION_TTL


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def json_answer(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": ref(name)}}}


def object_schema(properties: dict[str, Any], *, required: list[str] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    schema["required"] = list(properties) if required is None else required
    return schema


STRING = {"type": "string"}


NEW_PASSWORD: dict[str, Any] = {
    "type": "string",
    "minLength": MIN_LENGTH,
    "maxLength": MAX_TYPED_LENGTH,
    "description": f"{MIN_LENGTH} to {MAX_LENGTH} characters once NFKC-normalized (as typed, up to"
    f" {MAX_TYPED_LENGTH} code points: decomposed accents count once). Refused if it is a commonly"
    " used password, or the username or email.",
}


SCHEMAS: dict[str, Any] = {
    "Profile": object_schema(
        {
            "id": {"type": "string", "format": "uuid"},
            "username": STRING,
            "email": {"type": "string", "format": "email"},
            "display_name": STRING,
            "created_at": {"type": "string", "format": "date-time"},
            "email_verified": {
                "type": "boolean",
                "description": "Whether the owner proved they read `email` (POST /auth/verify-email); a new address"
                " is unverified. Other services mail only a verified address.",
            },
        }
    ),
    "Registration": object_schema(
        {
            "username": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{3,32}$"},
            "email": {"type": "string", "format": "email", "maxLength": MAX_EMAIL},
            "password": NEW_PASSWORD,
            "display_name": {"type": "string", "minLength": 1, "maxLength": MAX_DISPLAY_NAME},
        },
        required=["username", "email", "password"],
    ),
    "ProfileChanges": {
        **object_schema(
            {
                "display_name": {"type": "string", "minLength": 1, "maxLength": MAX_DISPLAY_NAME},
                "email": {"type": "string", "format": "email", "maxLength": MAX_EMAIL},
            },
            required=[],
        ),
        "minProperties": 1,
    },
    "Credentials": object_schema(
        {"username": {"type": "string", "description": "The username or the email"}, "password": STRING}
    ),
    "PasswordChange": object_schema(
        {
            "current_password": STRING,
            "new_password": {**NEW_PASSWORD, "description": NEW_PASSWORD["description"] + " Not the current one."},
        }
    ),
    "RefreshRequest": object_schema({"refresh_token": STRING}),
    "VerificationToken": object_schema(
        {
            "token": {
                "type": "string",
                "maxLength": MAX_TOKEN_LENGTH,
                "description": "The code mailed to the address (`Code: ...`); single use, lives"
                f" {VERIFICATION_TTL // 3600} hours",
            }
        }
    ),
    "VerificationSent": object_schema(
        {
            "email": {"type": "string", "format": "email", "description": "Where the code is mailed"},
            "expires_at": {"type": "string", "format": "date-time"},
        }
    ),
    "ClientCredentials": object_schema({"client_id": STRING, "client_secret": STRING}),
    "TokenPair": object_schema(
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
    "ServiceToken": object_schema(
        {
            "access_token": STRING,
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
            "type": STRING,
            "title": STRING,
            "status": {"type": "integer"},
            "detail": STRING,
            "code": STRING,
            "errors": {
                "type": "array",
                "items": {"type": "object", "properties": {"field": STRING, "message": STRING}},
            },
        },
        "required": ["type", "title", "status", "code"],
    },
}
