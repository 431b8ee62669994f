"""Text the service cannot store or hash is a 422 naming the field, never a 500.

PostgreSQL cannot store NUL in text, and a lone surrogate (JSON ``"\\ud800"``)
is not UTF-8, so it fails wherever a string is encoded: the login throttle's
key, argon2, the refresh-token hash, the client-secret comparison.
"""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import ClientResponse

from mesh_common.problems import ValidationFailed
from user_service.passwords import normalized
from user_service.validation import credentials

from .conftest import Auth, Client, Login, Register

PASSWORD = "a long and unusual passphrase"
SURROGATE = "\ud800"


async def field_errors(response: ClientResponse) -> set[str]:
    assert response.status == 422, await response.text()
    assert response.content_type == "application/problem+json"
    problem = await response.json()
    assert problem["code"] == "VALIDATION_FAILED"
    return {error["field"] for error in problem["errors"]}


def registration(**changes: Any) -> dict[str, Any]:
    return {"username": "ada", "email": "ada@example.com", "password": PASSWORD, **changes}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (registration(username="ada\n"), "username"),  # "$" alone let a trailing newline through
        (registration(email="ada\x00@example.com"), "email"),
        (registration(email=f"ada{SURROGATE}@example.com"), "email"),
        (registration(password=PASSWORD + SURROGATE), "password"),
    ],
)
async def test_a_registration_with_unstorable_text_names_the_field(
    client: Client, body: dict[str, Any], field: str
) -> None:
    assert await field_errors(await client.post("/users", json=body)) == {field}


@pytest.mark.parametrize(
    "email",
    ["alice\u200b@example.com", "ali\u202ece@example.com", "a\x01\x7f@example.com", "\x1b[31mx@example.com"],
)
async def test_an_email_with_invisible_or_control_characters_is_refused(client: Client, email: str) -> None:
    # Each would be an account apart from the address it looks like.
    assert await field_errors(await client.post("/users", json=registration(email=email))) == {"email"}


async def test_an_email_is_one_account_however_its_accents_are_composed(
    client: Client, register: Register, login: Login
) -> None:
    decomposed, composed = "jose\u0301@example.com", "jos\u00e9@example.com"
    await register("jose", decomposed)
    assert (await login(composed))["access_token"]
    response = await client.post("/users", json=registration(username="other", email=composed))
    assert response.status == 409


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/auth/login", {"username": "ada\x00", "password": PASSWORD}, "username"),
        ("/auth/login", {"username": f"ada{SURROGATE}", "password": PASSWORD}, "username"),
        ("/auth/login", {"username": "ada", "password": PASSWORD + SURROGATE}, "password"),
        ("/auth/refresh", {"refresh_token": SURROGATE}, "refresh_token"),
        ("/auth/logout", {"refresh_token": SURROGATE}, "refresh_token"),
        ("/auth/service-token", {"client_id": "notification-service", "client_secret": SURROGATE}, "client_secret"),
    ],
)
async def test_credentials_with_unstorable_text_name_the_field(
    client: Client, register: Register, path: str, body: dict[str, Any], field: str
) -> None:
    await register()

    assert await field_errors(await client.post(path, json=body)) == {field}


async def test_a_profile_change_with_unstorable_text_names_the_field(
    client: Client, register: Register, login: Login, auth: Auth
) -> None:
    await register()
    headers = auth((await login())["access_token"])

    response = await client.patch("/users/me", json={"email": "ada\x00@example.com"}, headers=headers)

    assert await field_errors(response) == {"email"}
    assert (await (await client.get("/users/me", headers=headers)).json())["email"] == "ada@example.com"


async def test_a_password_may_still_hold_nul_because_only_its_hash_is_stored(register: Register, login: Login) -> None:
    await register(password=PASSWORD + "\x00")

    assert (await login(password=PASSWORD + "\x00"))["access_token"]


def test_a_login_password_may_be_128_characters_as_typed_or_once_normalized() -> None:
    # Eight "\ufdfa" are 144 characters once normalized: registered before
    # normalization, when the limit counted them as typed, they are a hash
    # as typed that only the login's second try (Passwords.verify) matches.
    legacy, decomposed = "\ufdfa" * 8, "e\u0301" * 128
    assert (len(legacy), len(normalized(legacy)), len(decomposed), len(normalized(decomposed))) == (8, 144, 256, 128)
    for password in (legacy, decomposed):
        assert credentials({"username": "ada", "password": password}) == ("ada", password)
    for too_long in ("\ufdfa" * 129, "e\u0301" * 129, "x" * 129, "\u0301" * 513):
        with pytest.raises(ValidationFailed) as refused:
            credentials({"username": "ada", "password": too_long})
        assert [error["field"] for error in refused.value.extra["errors"]] == ["password"]


async def test_a_head_is_public_where_its_get_is(client: Client) -> None:
    # A monitor checking the JWKS with HEAD was told to sign in.
    assert (await client.head("/.well-known/jwks.json")).status == 200
    assert (await client.head("/users/me")).status == 401


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", "/.well-known/jwks.json", {"GET", "HEAD"}),
        ("GET", "/auth/login", {"POST"}),
        ("GET", "/users", {"POST"}),
    ],
)
async def test_a_wrong_method_is_a_405_with_allow_not_a_call_to_sign_in(
    client: Client, method: str, path: str, allow: set[str]
) -> None:
    response = await client.request(method, path)
    assert response.status == 405
    assert response.content_type == "application/problem+json"
    assert {m.strip() for m in response.headers["Allow"].split(",")} == allow


async def test_a_path_no_route_takes_is_a_404_token_or_not(client: Client) -> None:
    response = await client.get("/no/such/thing")
    assert (response.status, response.content_type) == (404, "application/problem+json")
