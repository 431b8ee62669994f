"""Email verification: codes issued with the change that needs them, proven once, asked for again."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import aiopg
import pytest
from structlog.testing import capture_logs

from mesh_common.events import Event
from user_service.openapi import document

from .conftest import PASSWORD, Auth, Client, Login, Register, assert_matches_contract

VERIFICATION = "user.email_verification_requested"
EMAIL_CHANGED = "user.email_changed"
PASSWORD_CHANGED = "user.password_changed"


async def outbox(db: aiopg.Pool, routing_key: str = VERIFICATION) -> list[Event]:
    """The events of ``routing_key`` written to the outbox, oldest first."""
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT payload FROM outbox WHERE routing_key = %s ORDER BY created_at", (routing_key,))
        return [Event.from_json(bytes(payload)) for (payload,) in await cur.fetchall()]


async def codes(db: aiopg.Pool) -> list[tuple[bytes, str, str, datetime]]:
    """Every stored code: (token_hash, user_id, email, expires_at)."""
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT token_hash, user_id, email, expires_at FROM email_verifications")
        return [
            (bytes(token_hash), str(user_id), email, expires)
            for token_hash, user_id, email, expires in await cur.fetchall()
        ]


async def latest_code(db: aiopg.Pool) -> str:
    return str((await outbox(db))[-1].data["token"])


async def age_codes(db: aiopg.Pool, seconds: int) -> None:
    """Make every stored code ``seconds`` older, as if issued that long ago."""
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "UPDATE email_verifications SET created_at = created_at - make_interval(secs => %s)", (seconds,)
        )


async def verify(client: Client, token: Any) -> tuple[int, dict[str, Any] | None]:
    response = await client.post("/auth/verify-email", json={"token": token})
    return response.status, (await response.json() if response.status != 204 else None)


async def me(client: Client, headers: dict[str, str]) -> dict[str, Any]:
    response = await client.get("/users/me", headers=headers)
    assert response.status == 200
    body: dict[str, Any] = await response.json()
    return body


async def test_registration_issues_a_code_with_the_account(client: Client, db: aiopg.Pool) -> None:
    body = {"username": "ada", "email": "ada@example.com", "password": "a long and unusual passphrase"}
    response = await client.post("/users", json={**body, "display_name": "Ada"}, headers={"X-Request-ID": "req-1"})
    user = await response.json()
    assert user["email_verified"] is False

    [event] = await outbox(db)
    assert (event.type, event.user_id, event.correlation_id) == (VERIFICATION, user["id"], "req-1")
    data = event.data
    assert {key: data[key] for key in ("user_id", "username", "display_name", "email", "reason")} == {
        "user_id": user["id"],
        "username": "ada",
        "display_name": "Ada",
        "email": "ada@example.com",
        "reason": "registered",
    }
    token = data["token"]
    assert isinstance(token, str) and len(token) == 43
    [(token_hash, user_id, email, expires_at)] = await codes(db)
    # Only the code's hash is stored, for the address it was mailed to.
    assert (token_hash, user_id, email) == (hashlib.sha256(token.encode()).digest(), user["id"], "ada@example.com")
    assert datetime.fromisoformat(data["expires_at"]) == expires_at
    assert expires_at.utcoffset() is not None
    assert timedelta(hours=23, minutes=59) < expires_at - datetime.now(UTC) <= timedelta(hours=24)
    assert len(await outbox(db, "user.registered")) == 1
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT count(*) FROM email_verifications WHERE token_hash = %s", (token.encode(),))
        assert await cur.fetchone() == (0,)


async def test_the_event_matches_its_asyncapi_contract(register: Register, db: aiopg.Pool) -> None:
    await register("ada")
    [event] = await outbox(db)
    assert_matches_contract(event, "UserEmailVerificationRequestedEvent")


async def test_a_code_verifies_the_address_once_and_needs_no_access_token(
    client: Client, register: Register, login: Login, auth: Auth, db: aiopg.Pool
) -> None:
    await register("ada")
    token = await latest_code(db)

    assert await verify(client, token) == (204, None)

    headers = auth((await login("ada"))["access_token"])
    assert (await me(client, headers))["email_verified"] is True
    status, problem = await verify(client, token)
    assert (status, problem and problem["code"]) == (400, "INVALID_VERIFICATION_TOKEN")
    assert await codes(db) == []


async def test_unknown_and_expired_codes_get_one_answer(client: Client, register: Register, db: aiopg.Pool) -> None:
    await register("ada")
    token = await latest_code(db)
    unknown_status, unknown = await verify(client, "x" * 43)
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("UPDATE email_verifications SET expires_at = now() - interval '1 second'")
    expired_status, expired = await verify(client, token)

    assert (unknown_status, expired_status) == (400, 400)
    assert unknown == expired
    assert unknown is not None and unknown["code"] == "INVALID_VERIFICATION_TOKEN"
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT email_verified_at FROM users")
        assert await cur.fetchone() == (None,)


async def test_a_code_for_an_address_the_account_left_verifies_nothing(
    client: Client, register: Register, login: Login, auth: Auth, db: aiopg.Pool
) -> None:
    await register("ada")
    old_token = await latest_code(db)
    headers = auth((await login("ada"))["access_token"])
    changed = await client.patch("/users/me", json={"email": "ada@lovelace.org"}, headers=headers)
    assert changed.status == 200

    status, problem = await verify(client, old_token)
    assert (status, problem and problem["code"]) == (400, "INVALID_VERIFICATION_TOKEN")
    # Nor once the account has the old address back: that needs a new code.
    assert (await client.patch("/users/me", json={"email": "ada@example.com"}, headers=headers)).status == 200
    assert (await verify(client, old_token))[0] == 400
    assert (await me(client, headers))["email_verified"] is False


async def test_changing_the_email_unverifies_it_and_mails_a_code_to_the_new_one(
    client: Client, register: Register, login: Login, auth: Auth, db: aiopg.Pool
) -> None:
    await register("ada")
    assert (await verify(client, await latest_code(db)))[0] == 204
    headers = auth((await login("ada"))["access_token"])

    response = await client.patch("/users/me", json={"email": "Ada@Lovelace.org"}, headers=headers)

    assert response.status == 200
    assert (await response.json())["email_verified"] is False
    event = (await outbox(db))[-1]
    assert (event.data["reason"], event.data["email"]) == ("email_changed", "Ada@Lovelace.org")
    assert [email for _, _, email, _ in await codes(db)] == ["Ada@Lovelace.org"]
    assert (await verify(client, event.data["token"]))[0] == 204
    assert (await me(client, headers))["email_verified"] is True


async def test_changing_the_email_tells_the_old_address_as_the_account_had_it(
    client: Client, register: Register, login: Login, auth: Auth, db: aiopg.Pool
) -> None:
    # Whoever has the password moves the account to an address of theirs,
    # and renames it in the same breath: the owner is told at the old
    # address, greeted by the old name.
    ada = await register("ada")
    assert (await verify(client, await latest_code(db)))[0] == 204
    headers = {**auth((await login("ada"))["access_token"]), "X-Request-ID": "req-move-ada"}

    body = {"email": "taker@example.org", "display_name": "Not Ada"}
    assert (await client.patch("/users/me", json=body, headers=headers)).status == 200

    [event] = await outbox(db, EMAIL_CHANGED)
    assert (event.type, event.user_id, event.correlation_id) == (EMAIL_CHANGED, ada["id"], "req-move-ada")
    assert event.data == {
        "user_id": ada["id"],
        "username": "ada",
        "display_name": ada["display_name"],
        "email": "ada@example.com",
        "email_verified": True,
    }
    assert_matches_contract(event, "UserEmailChangedEvent")
    # From the taker's unverified address on, the event says so, and names
    # the last address proven, where the notification-service mails instead.
    assert (await client.patch("/users/me", json={"email": "ada@example.com"}, headers=headers)).status == 200
    assert await notices(db, EMAIL_CHANGED) == [
        ("ada@example.com", True, None),
        ("taker@example.org", False, "ada@example.com"),
    ]


async def test_while_the_address_is_unverified_notices_name_the_last_one_proven(
    client: Client, register: Register, login: Login, auth: Auth, db: aiopg.Pool
) -> None:
    # The taker, with the password, changes the case of the owner's address
    # (which unverifies it), then moves the account to theirs, then changes
    # the password. Every notice names the owner's proven address, until the
    # taker proves theirs.
    await register("ada")
    assert (await verify(client, await latest_code(db)))[0] == 204
    headers = auth((await login("ada"))["access_token"])
    for email in ("Ada@example.com", "taker@example.org"):
        assert (await client.patch("/users/me", json={"email": email}, headers=headers)).status == 200
    body = {"current_password": PASSWORD, "new_password": "the taker's own passphrase, long"}
    response = await client.post("/users/me/password", json=body, headers=headers)
    assert response.status == 200
    headers = auth((await response.json())["access_token"])

    told = [("ada@example.com", True, None), ("Ada@example.com", False, "ada@example.com")]
    assert await notices(db, EMAIL_CHANGED) == told
    assert await notices(db, PASSWORD_CHANGED) == [("taker@example.org", False, "ada@example.com")]
    for event in await outbox(db, EMAIL_CHANGED) + await outbox(db, PASSWORD_CHANGED):
        assert_matches_contract(
            event, "UserPasswordChangedEvent" if event.type == PASSWORD_CHANGED else "UserEmailChangedEvent"
        )
    assert "last_verified_email" not in await me(client, headers)

    # Proven, the taker's address is the last one proven: the owner was told twice.
    assert (await verify(client, await latest_code(db)))[0] == 204
    body = {"current_password": body["new_password"], "new_password": "and another passphrase, longer"}
    assert (await client.post("/users/me/password", json=body, headers=headers)).status == 200
    assert (await notices(db, PASSWORD_CHANGED))[-1] == ("taker@example.org", True, None)
    # Nor is the owner's address kept any longer than it is needed.
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT last_verified_email FROM users")
        assert await cur.fetchall() == [(None,)]


async def notices(db: aiopg.Pool, routing_key: str) -> list[tuple[str, bool, str | None]]:
    """(email, email_verified, last_verified_email) of each notice of ``routing_key``, oldest first."""
    return [
        (e.data["email"], e.data["email_verified"], e.data.get("last_verified_email"))
        for e in await outbox(db, routing_key)
    ]


async def test_a_patch_that_keeps_the_email_keeps_it_verified_and_mails_nothing(
    client: Client, register: Register, login: Login, auth: Auth, db: aiopg.Pool
) -> None:
    await register("ada")
    assert (await verify(client, await latest_code(db)))[0] == 204
    headers = auth((await login("ada"))["access_token"])

    for body in ({"email": "ada@example.com"}, {"display_name": "Ada"}, {"email": " ada@example.com "}):
        response = await client.patch("/users/me", json=body, headers=headers)
        assert response.status == 200
        assert (await response.json())["email_verified"] is True
    assert len(await outbox(db)) == 1
    assert await codes(db) == []
    assert await outbox(db, EMAIL_CHANGED) == []


async def test_a_patch_to_a_taken_email_writes_nothing(
    client: Client, register: Register, login: Login, auth: Auth, db: aiopg.Pool
) -> None:
    await register("ada")
    assert (await verify(client, await latest_code(db)))[0] == 204
    await register("grace")
    before = (await outbox(db), await codes(db))
    headers = auth((await login("ada"))["access_token"])

    response = await client.patch("/users/me", json={"email": "grace@example.com"}, headers=headers)

    assert response.status == 409
    assert (await outbox(db), await codes(db)) == before
    assert await outbox(db, EMAIL_CHANGED) == []
    assert (await me(client, headers))["email_verified"] is True


async def test_a_resend_mails_a_new_code_once_a_minute(
    client: Client, register: Register, login: Login, auth: Auth, db: aiopg.Pool
) -> None:
    await register("ada")
    first = await latest_code(db)
    assert (await client.post("/users/me/email/verification")).status == 401
    headers = auth((await login("ada"))["access_token"])
    # The registration's code counts: a minute must pass after it too.
    early = await client.post("/users/me/email/verification", headers=headers)
    assert early.status == 429
    assert (await early.json())["code"] == "VERIFICATION_RECENTLY_SENT"
    assert 1 <= int(early.headers["Retry-After"]) <= 60
    await age_codes(db, 61)

    response = await client.post("/users/me/email/verification", headers=headers)

    assert response.status == 202
    body = await response.json()
    event = (await outbox(db))[-1]
    assert body == {"email": "ada@example.com", "expires_at": event.data["expires_at"]}
    assert event.data["reason"] == "requested"
    again = await client.post("/users/me/email/verification", headers=headers)
    assert again.status == 429
    assert int(again.headers["Retry-After"]) >= 59
    # The first code works still (its mail may be the one that arrives), and
    # using it ends the other.
    assert (await verify(client, first))[0] == 204
    assert (await verify(client, event.data["token"]))[0] == 400
    verified = await client.post("/users/me/email/verification", headers=headers)
    assert verified.status == 409
    assert (await verified.json())["code"] == "EMAIL_ALREADY_VERIFIED"
    assert len(await outbox(db)) == 2


async def test_an_account_from_before_may_ask_for_a_code(
    client: Client, register: Register, login: Login, auth: Auth, db: aiopg.Pool
) -> None:
    await register("ada")
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("TRUNCATE email_verifications, outbox")
    headers = auth((await login("ada"))["access_token"])
    assert (await me(client, headers))["email_verified"] is False

    assert (await client.post("/users/me/email/verification", headers=headers)).status == 202
    assert (await verify(client, await latest_code(db)))[0] == 204


@pytest.mark.parametrize(
    ("body", "field"),
    [({}, "token"), ({"token": 7}, "token"), ({"token": "x" * 201}, "token"), ({"token": "x", "code": "y"}, "code")],
)
async def test_a_malformed_verification_names_the_field(client: Client, body: dict[str, Any], field: str) -> None:
    response = await client.post("/auth/verify-email", json=body)
    assert response.status == 422
    problem = await response.json()
    assert problem["code"] == "VALIDATION_FAILED"
    assert field in {error["field"] for error in problem["errors"]}


async def test_a_verification_body_that_is_no_object_is_refused(client: Client) -> None:
    response = await client.post("/auth/verify-email", json=["token"])
    assert response.status == 422


async def test_the_openapi_document_describes_verification() -> None:
    paths = document()["paths"]
    verify_email = paths["/auth/verify-email"]["post"]
    assert verify_email["security"] == []
    assert "INVALID_VERIFICATION_TOKEN" in verify_email["responses"]["400"]["description"]
    resend = paths["/users/me/email/verification"]["post"]["responses"]
    assert resend["409"]["description"].startswith("EMAIL_ALREADY_VERIFIED:")
    assert resend["429"]["description"].startswith("VERIFICATION_RECENTLY_SENT:")
    profile = document()["components"]["schemas"]["Profile"]
    assert "email_verified" in profile["required"]


async def test_no_log_line_holds_a_code(
    client: Client, register: Register, login: Login, auth: Auth, db: aiopg.Pool
) -> None:
    with capture_logs() as logs:
        await register("ada")
        first = await latest_code(db)
        await age_codes(db, 61)
        headers = auth((await login("ada"))["access_token"])
        assert (await client.post("/users/me/email/verification", headers=headers)).status == 202
        second = await latest_code(db)
        assert (await verify(client, first))[0] == 204
        assert (await verify(client, second))[0] == 400

    events = [entry["event"] for entry in logs]
    assert {"email_verification_issued", "email_verification_rejected", "email_verified"} <= set(events)
    assert not [entry for entry in logs if first in repr(entry) or second in repr(entry)]
