"""Logging in by username or email, and the access tokens given to users and to services."""

from __future__ import annotations

import aiohttp
import jwt

from .conftest import SERVICE_SECRET, Auth, Client, Login, Register

CREDENTIALS = {"client_id": "notification-service", "client_secret": SERVICE_SECRET}


async def test_login_accepts_the_username_or_the_email_in_any_case(register: Register, login: Login) -> None:
    await register("ada", "ada@example.com")
    for name in ("ada", "ADA", "Ada@Example.com"):
        assert (await login(name))["token_type"] == "Bearer"


async def test_access_tokens_are_short_lived_eddsa_jwts(client: Client, register: Register, login: Login) -> None:
    user = await register()
    tokens = await login()
    header = jwt.get_unverified_header(tokens["access_token"])
    claims = jwt.decode(tokens["access_token"], options={"verify_signature": False})
    jwks = await (await client.get("/.well-known/jwks.json")).json()
    assert header["alg"] == "EdDSA" and header["typ"] == "at+jwt"
    assert header["kid"] in {key["kid"] for key in jwks["keys"]}
    assert {"iss", "aud", "exp", "iat", "nbf", "sub", "jti"} <= claims.keys()
    assert claims["sub"] == user["id"]
    assert claims["exp"] - claims["iat"] == tokens["expires_in"] <= 15 * 60
    assert "." not in tokens["refresh_token"]  # opaque, not a JWT


async def test_services_get_a_users_read_token_and_may_read_any_profile(
    client: Client, register: Register, auth: Auth
) -> None:
    ada = await register()
    response = await client.post("/auth/service-token", json=CREDENTIALS)
    assert response.status == 200
    issued = await response.json()
    claims = jwt.decode(issued["access_token"], options={"verify_signature": False})
    assert claims["sub"] == "service:notification-service"
    assert claims["scope"] == issued["scope"] == "users:read"
    profile = await client.get(f"/users/{ada['id']}", headers=auth(issued["access_token"]))
    assert profile.status == 200
    assert await profile.json() == ada
    unknown = await client.get("/users/00000000-0000-0000-0000-000000000000", headers=auth(issued["access_token"]))
    assert unknown.status == 404
    assert (await unknown.json())["code"] == "USER_NOT_FOUND"
    # Other spellings of the same id that Python reads and PostgreSQL would not.
    for spelling in (f"urn:uuid:{ada['id']}", ada["id"].replace("-", ""), ada["id"].upper()):
        other = await client.get(f"/users/{spelling}", headers=auth(issued["access_token"]))
        assert (other.status, await other.json()) == (200, ada), spelling
    # A service has no profile of its own: its token is valid, for something else.
    assert (await client.get("/users/me", headers=auth(issued["access_token"]))).status == 403


async def test_wrong_client_credentials_are_refused(client: Client) -> None:
    for body in (
        {"client_id": "notification-service", "client_secret": "wrong-secret-0123456789"},
        {"client_id": "stranger", "client_secret": SERVICE_SECRET},
    ):
        response = await client.post("/auth/service-token", json=body)
        assert response.status == 401
        assert (await response.json())["code"] == "INVALID_CLIENT"


async def test_client_secrets_are_throttled_per_client_and_address(client: Client) -> None:
    # Only the network reaches this endpoint, but a secret an operator chose
    # can be a word: without a count, a dictionary against it went unbounded.
    wrong = {**CREDENTIALS, "client_secret": "wrong-secret-0123456789"}
    statuses = [(await client.post("/auth/service-token", json=wrong)).status for _ in range(10)]
    assert statuses == [401] * 10
    refused = await client.post("/auth/service-token", json=CREDENTIALS)
    assert refused.status == 429, "the right secret too, from the guessing address"
    assert (await refused.json())["code"] == "RATE_LIMITED"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    # The real service, calling from its own address, is not locked out by
    # someone else's guesses (an account's count is per account alone).
    url = client.make_url("/auth/service-token")
    elsewhere = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=elsewhere) as session, session.post(url, json=CREDENTIALS) as response:
        assert response.status == 200, await response.text()


async def test_right_client_secrets_do_not_count(client: Client) -> None:
    wrong = {**CREDENTIALS, "client_secret": "wrong-secret-0123456789"}
    for _ in range(9):
        assert (await client.post("/auth/service-token", json=wrong)).status == 401
    for _ in range(3):
        assert (await client.post("/auth/service-token", json=CREDENTIALS)).status == 200
    assert (await client.post("/auth/service-token", json=wrong)).status == 401
    assert (await client.post("/auth/service-token", json=CREDENTIALS)).status == 429
