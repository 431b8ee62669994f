"""Full-width and half-width forms in emails: one account with the address they
stand for, at sign-up, on a change and at login, and migration 0011 for rows
stored before."""

from __future__ import annotations

import re
import unicodedata

import aiopg
import psycopg2
import pytest

from user_service.app import MIGRATIONS
from user_service.validation import WIDTH_MAPPING

from .conftest import Auth, Client, Login, Register, run_again, store_email, stored_email

PASSWORD = "a long and unusual passphrase"
EMAILS_WIDTH_MAPPED = MIGRATIONS[0] / "0011_users_email_width.sql"
WIDE_JOHN = "\uff4a\uff4f\uff48\uff4e@example.com"  # "john" in full-width letters


def test_the_width_mapping_is_every_full_width_and_half_width_form() -> None:
    # Scanned over all of Unicode, not just the blocks the table reads.
    forms = {
        code: int(mapping.split()[1], 16)
        for code in range(0x110000)
        if (mapping := unicodedata.decomposition(chr(code))).startswith(("<wide>", "<narrow>"))
    }
    assert forms == WIDTH_MAPPING


def test_the_migration_maps_with_the_same_table() -> None:
    quoted = re.findall(r"'((?:[^']|'')*)'", EMAILS_WIDTH_MAPPED.read_text())
    table = ["".join(map(chr, WIDTH_MAPPING)), "".join(map(chr, WIDTH_MAPPING.values()))]
    assert [text.replace("''", "'") for text in quoted if len(text) > 100] == table


async def test_an_email_typed_in_full_width_is_the_address_it_stands_for(
    client: Client, register: Register, login: Login
) -> None:
    john = await register("john", WIDE_JOHN)
    assert john["email"] == "john@example.com"
    for spelling in (WIDE_JOHN, "john@example.com", "JOHN@example.com"):
        assert (await login(spelling))["access_token"]
    response = await client.post(
        "/users", json={"username": "other", "email": "john@example.com", "password": PASSWORD}
    )
    assert response.status == 409
    assert (await response.json())["code"] == "ACCOUNT_EXISTS"


async def test_a_half_width_voiced_kana_is_composed_after_it_is_mapped(register: Register) -> None:
    # Half-width "ｶﾞ" is two characters; mapped, they compose into "ガ".
    ga = await register("gaga", "\uff76\uff9e@example.com")
    assert ga["email"] == "\u30ac@example.com"


async def test_an_email_changed_to_full_width_is_stored_mapped(
    client: Client, register: Register, login: Login, auth: Auth
) -> None:
    await register("ada")
    token = (await login("ada"))["access_token"]
    response = await client.patch("/users/me", json={"email": WIDE_JOHN}, headers=auth(token))
    assert response.status == 200, await response.text()
    assert (await response.json())["email"] == "john@example.com"


async def test_a_full_width_email_stored_before_is_mapped_so_it_logs_in_and_stays_taken(
    client: Client, register: Register, login: Login, db: aiopg.Pool
) -> None:
    john = await register("john", "john-for-now@example.com")
    untouched = await register("ada", "\uff41\uff44\uff41-is-not-stored-wide@example.com")  # mapped at sign-up
    await store_email(db, john["id"], WIDE_JOHN)

    await run_again(db, EMAILS_WIDTH_MAPPED.read_text())

    assert await stored_email(db, john["id"]) == "john@example.com"
    assert await stored_email(db, untouched["id"]) == "ada-is-not-stored-wide@example.com"
    assert (await login(WIDE_JOHN))["access_token"]
    response = await client.post(
        "/users", json={"username": "other", "email": "john@example.com", "password": PASSWORD}
    )
    assert response.status == 409
    await run_again(db, EMAILS_WIDTH_MAPPED.read_text())  # a second run finds nothing to do


async def test_emails_that_become_one_address_stop_the_migration_naming_their_accounts(
    register: Register, db: aiopg.Pool
) -> None:
    john = await register("john", "John@example.com")
    wide = await register("wide", "wide-for-now@example.com")
    grace = await register("grace")  # not one of them
    await store_email(db, wide["id"], WIDE_JOHN)

    with pytest.raises(psycopg2.errors.RaiseException, match="one address once their widths are mapped") as refused:
        await run_again(db, EMAILS_WIDTH_MAPPED.read_text())

    message = str(refused.value)
    assert john["id"] in message and wide["id"] in message
    assert grace["id"] not in message
    assert await stored_email(db, wide["id"]) == WIDE_JOHN


async def test_an_email_that_mapping_would_make_no_address_stops_the_migration(
    register: Register, db: aiopg.Pool
) -> None:
    # A full-width "@" in the local part passed the old pattern; mapped, it is a second "@".
    odd = await register("odd", "odd-for-now@example.com")
    grace = await register("grace")
    stored = "a\uff20b@example.com"
    await store_email(db, odd["id"], stored)

    with pytest.raises(psycopg2.errors.RaiseException, match="no longer an address") as refused:
        await run_again(db, EMAILS_WIDTH_MAPPED.read_text())

    assert odd["id"] in str(refused.value) and grace["id"] not in str(refused.value)
    assert await stored_email(db, odd["id"]) == stored
