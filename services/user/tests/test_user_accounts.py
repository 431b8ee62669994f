"""Registration and profiles, through the HTTP API against real PostgreSQL."""

from __future__ import annotations

import threading
import unicodedata
from collections.abc import Callable
from typing import Any

import aiopg
import pytest
from argon2 import PasswordHasher

from user_service.openapi import document

from .conftest import Auth, Client, Login, Register

PASSWORD = "a long and unusual passphrase"
# Where a transaction commits, and may lose its answer: a 500 OUTCOME_UNKNOWN documented.
COMMITTING = {
    ("post", "/users"),
    ("patch", "/users/me"),
    ("post", "/users/me/password"),
    ("post", "/users/me/email/verification"),
    ("post", "/auth/refresh"),
    ("post", "/auth/logout"),
    ("post", "/auth/verify-email"),
}


async def test_registration_returns_the_public_profile(client: Client) -> None:
    response = await client.post("/users", json={"username": "ada", "email": "ada@example.com", "password": PASSWORD})
    assert response.status == 201
    body = await response.json()
    assert set(body) == {"id", "username", "email", "display_name", "created_at", "email_verified"}
    assert (body["username"], body["email"], body["display_name"]) == ("ada", "ada@example.com", "ada")
    assert body["email_verified"] is False


async def test_passwords_are_stored_as_argon2id_hashes(register: Register, db: aiopg.Pool) -> None:
    user = await register()
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT password_hash FROM users WHERE id = %s", (user["id"],))
        (stored,) = await cur.fetchone()
    assert stored.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert PASSWORD not in stored


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"username": "a", "email": "a@example.com", "password": PASSWORD}, "username"),
        ({"username": "ada@home", "email": "a@example.com", "password": PASSWORD}, "username"),
        ({"username": "ada", "email": "not-an-email", "password": PASSWORD}, "email"),
        ({"username": "ada", "email": "ada@example.com", "password": "short"}, "password"),
        ({"username": "ada", "email": "ada@example.com", "password": "x" * 129}, "password"),
        ({"username": "ada", "email": "ada@example.com", "password": "password123"}, "password"),
        ({"username": "ada", "email": "ada@example.com", "password": "Iloveyou1"}, "password"),
        # Compared after NFKC: "password1" in full-width letters, and four
        # decomposed "é" (eight code points, four characters).
        (
            {
                "username": "ada",
                "email": "ada@example.com",
                "password": "\uff50\uff41\uff53\uff53\uff57\uff4f\uff52\uff44\uff11",
            },
            "password",
        ),
        ({"username": "ada", "email": "ada@example.com", "password": "e\u0301" * 4}, "password"),
        ({"username": "ada_lovelace", "email": "ada@example.com", "password": "Ada_Lovelace"}, "password"),
        # The email as the password, compared after NFKC on both sides: "fi" as
        # one ligature character in the address, as two letters in the password.
        ({"username": "ada", "email": "\ufb01sh@example.com", "password": "fish@example.com"}, "password"),
        ({"username": "ada", "email": "ada@example.com"}, "password"),
        ({"username": "ada", "email": "ada@example.com", "password": PASSWORD, "is_admin": True}, "is_admin"),
        ({"username": 7, "email": "ada@example.com", "password": PASSWORD}, "username"),
    ],
)
async def test_invalid_registrations_name_the_field(client: Client, body: dict[str, Any], field: str) -> None:
    response = await client.post("/users", json=body)
    assert response.status == 422
    assert response.content_type == "application/problem+json"
    problem = await response.json()
    assert problem["code"] == "VALIDATION_FAILED"
    assert field in {error["field"] for error in problem["errors"]}


@pytest.mark.parametrize("password", ["k3#Lq9!z", "q" * 64 + "w" * 64])  # 8 and 128 characters, the bounds
async def test_passwords_at_the_length_bounds_are_taken(client: Client, password: str) -> None:
    response = await client.post("/users", json={"username": "ada", "email": "ada@example.com", "password": password})
    assert response.status == 201, await response.text()
    login = await client.post("/auth/login", json={"username": "ada", "password": password})
    assert login.status == 200


async def test_a_password_logs_in_whichever_unicode_form_it_is_typed_in(client: Client) -> None:
    composed, decomposed = "caf\u00e9 au lait, sans sucre", "cafe\u0301 au lait, sans sucre"
    body = {"username": "ada", "email": "ada@example.com", "password": composed}
    assert (await client.post("/users", json=body)).status == 201
    login = await client.post("/auth/login", json={"username": "ada", "password": decomposed})
    assert login.status == 200


async def test_a_long_password_logs_in_in_the_unicode_form_it_registered_in(client: Client) -> None:
    # 128 characters once normalized, as registration counts them, and 256
    # code points as typed decomposed: login must count the same way.
    decomposed = "e\u0301" * 128
    body = {"username": "ada", "email": "ada@example.com", "password": decomposed}
    assert (await client.post("/users", json=body)).status == 201
    for typed in (decomposed, unicodedata.normalize("NFC", decomposed)):
        login = await client.post("/auth/login", json={"username": "ada", "password": typed})
        assert login.status == 200, await login.text()
    too_long = await client.post("/auth/login", json={"username": "ada", "password": "e\u0301" * 129})
    assert too_long.status == 422


async def test_argon2_never_runs_on_the_event_loop(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    for name in ("hash", "verify"):
        original = getattr(PasswordHasher, name)

        def spy(self: PasswordHasher, *args: Any, __original: Callable[..., Any] = original, __name: str = name) -> Any:
            threads.append(f"{__name} in {threading.current_thread().name}")
            return __original(self, *args)

        monkeypatch.setattr(PasswordHasher, name, spy)
    loop_thread = threading.current_thread().name
    await client.post("/users", json={"username": "ada", "email": "ada@example.com", "password": PASSWORD})
    assert (await client.post("/auth/login", json={"username": "ada", "password": PASSWORD})).status == 200
    assert (await client.post("/auth/login", json={"username": "nobody", "password": PASSWORD})).status == 401
    assert [entry.split(" in ")[0] for entry in threads] == ["hash", "verify", "verify"]
    assert not [entry for entry in threads if entry.endswith(f" in {loop_thread}")], threads


async def test_usernames_and_emails_are_unique_whatever_their_case(client: Client, register: Register) -> None:
    await register("ada", "ada@example.com")
    for username, email in [("ADA", "other@example.com"), ("grace", "Ada@Example.COM")]:
        response = await client.post("/users", json={"username": username, "email": email, "password": PASSWORD})
        assert response.status == 409
        assert (await response.json())["code"] == "ACCOUNT_EXISTS"


async def test_an_oversized_body_is_refused_with_413(client: Client) -> None:
    body = {"username": "ada", "email": "ada@example.com", "password": PASSWORD, "display_name": "x" * 70_000}
    response = await client.post("/users", json=body)
    assert response.status == 413
    assert (await response.json())["code"] == "PAYLOAD_TOO_LARGE"


# Every operation that reads a JSON body, as the document names them.
BODY_OPERATIONS = [
    (method, path)
    for path, item in document()["paths"].items()
    for method, operation in item.items()
    if "requestBody" in operation
]


@pytest.mark.parametrize(("method", "path"), BODY_OPERATIONS)
@pytest.mark.parametrize(
    ("headers", "body", "status", "code"),
    [
        pytest.param(
            {"Content-Type": "application/json"},
            b'{"username": "' + b"x" * 70_000 + b'"}',
            413,
            "PAYLOAD_TOO_LARGE",
            id="too-large",
        ),
        pytest.param({"Content-Type": "text/plain"}, b"{}", 415, "UNSUPPORTED_MEDIA_TYPE", id="not-json"),
        pytest.param(
            {"Content-Type": "application/json", "Content-Encoding": "gzip"},
            b'{"username": "not compressed"}',
            400,
            "MALFORMED_BODY",
            id="not-gzip",
        ),
    ],
)
async def test_the_openapi_document_lists_what_an_unreadable_body_gets(
    client: Client,
    register: Register,
    login: Login,
    auth: Auth,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    status: int,
    code: str,
) -> None:
    await register()
    headers = {**headers, **auth((await login())["access_token"])}  # PATCH /users/me needs it; the rest ignore it

    response = await client.request(method.upper(), path, data=body, headers=headers)

    assert response.status == status, await response.text()
    assert (await response.json())["code"] == code
    described = document()["paths"][path][method]["responses"]
    assert str(status) in described, f"{method.upper()} {path} does not list {status}"
    assert described[str(status)]["description"].startswith(f"{code}:")


async def test_me_needs_a_token(client: Client) -> None:
    response = await client.get("/users/me")
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"


async def test_every_401_carries_a_challenge(client: Client, register: Register) -> None:
    # RFC 9110: a 401 must say how to authenticate; RFC 6750 names the error.
    response = await client.get("/users/me", headers={"Authorization": "Bearer not-a-token"})
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    await register()
    response = await client.post("/auth/login", json={"username": "ada", "password": "not the password"})
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"


async def test_me_returns_the_callers_profile(client: Client, register: Register, login: Login, auth: Auth) -> None:
    user = await register()
    tokens = await login()
    response = await client.get("/users/me", headers=auth(tokens["access_token"]))
    assert response.status == 200
    assert await response.json() == user


async def test_patch_me_changes_display_name_and_email(
    client: Client, register: Register, login: Login, auth: Auth
) -> None:
    await register()
    headers = auth((await login())["access_token"])
    response = await client.patch(
        "/users/me", json={"display_name": "  Ada Lovelace ", "email": "ada@lovelace.org"}, headers=headers
    )
    assert response.status == 200
    changed = await response.json()
    assert (changed["display_name"], changed["email"]) == ("Ada Lovelace", "ada@lovelace.org")
    assert await (await client.get("/users/me", headers=headers)).json() == changed


@pytest.mark.parametrize(
    "body",
    [{"username": "root"}, {"password": "another long passphrase"}, {"display_name": ""}, {}, {"email": 1}],
)
async def test_patch_me_refuses_unknown_or_invalid_fields(
    client: Client, register: Register, login: Login, auth: Auth, body: dict[str, Any]
) -> None:
    await register()
    response = await client.patch("/users/me", json=body, headers=auth((await login())["access_token"]))
    assert response.status == 422
    assert (await response.json())["code"] == "VALIDATION_FAILED"


async def test_patch_me_to_a_taken_email_is_a_conflict(
    client: Client, register: Register, login: Login, auth: Auth
) -> None:
    await register("ada")
    await register("grace")
    response = await client.patch(
        "/users/me", json={"email": "GRACE@example.com"}, headers=auth((await login("ada"))["access_token"])
    )
    assert response.status == 409
    assert (await response.json())["code"] == "ACCOUNT_EXISTS"


async def test_a_user_may_read_their_own_profile_by_id_but_no_other(
    client: Client, register: Register, login: Login, auth: Auth
) -> None:
    ada = await register("ada")
    grace = await register("grace")
    headers = auth((await login("ada"))["access_token"])
    # Any spelling of their own id that the service reads is theirs too.
    for spelling in (ada["id"], ada["id"].upper(), f"urn:uuid:{ada['id']}", ada["id"].replace("-", "")):
        own = await client.get(f"/users/{spelling}", headers=headers)
        assert own.status == 200, spelling
        assert await own.json() == ada
    for spelling in (grace["id"], grace["id"].upper(), "not-an-id"):
        other = await client.get(f"/users/{spelling}", headers=headers)
        assert other.status == 403, spelling


async def test_profiles_never_contain_the_password_hash(
    client: Client, register: Register, login: Login, auth: Auth
) -> None:
    ada = await register()
    headers = auth((await login())["access_token"])
    for path in ("/users/me", f"/users/{ada['id']}"):
        text = await (await client.get(path, headers=headers)).text()
        assert "argon2" not in text
        assert "password" not in text


async def test_openapi_describes_every_route(client: Client) -> None:
    response = await client.get("/openapi.json")
    assert response.status == 200
    served = await response.json()
    assert served["openapi"] == "3.1.0"
    assert served == document()
    operations = {operation["operationId"] for path in served["paths"].values() for operation in path.values()}
    named_routes = {route.name for route in client.app.router.routes() if route.name}
    assert named_routes - {"health", "health.live"} == operations


def test_every_operation_that_reads_the_database_documents_its_503() -> None:
    for path, item in document()["paths"].items():
        for method, operation in item.items():
            # The keys and the client credentials are in memory.
            answered_from_memory = path in {"/.well-known/jwks.json", "/openapi.json", "/auth/service-token"}
            documented = "DEPENDENCY_UNAVAILABLE" in operation["responses"].get("503", {}).get("description", "")
            assert documented != answered_from_memory, (method, path)
            lost = operation["responses"].get("500", {}).get("description", "")
            assert lost.startswith("OUTCOME_UNKNOWN:") == ((method, path) in COMMITTING), (method, path)
