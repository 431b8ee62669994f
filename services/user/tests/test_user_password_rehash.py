"""At login a stored password hash is brought up to the settings, never weakened, and never written over a newer one."""

from __future__ import annotations

from typing import TypedDict

import aiopg
import pytest
from argon2 import PasswordHasher

from user_service import repository
from user_service.passwords import normalized

from .conftest import PASSWORD, Client, Login, Register


class HashParameters(TypedDict):
    """An older hash's costs, as ``PasswordHasher`` takes them."""

    time_cost: int
    memory_cost: int
    parallelism: int


async def hash_after_login(db: aiopg.Pool, login: Login, user_id: str, stored: str, password: str = PASSWORD) -> str:
    """The hash in ``user_id``'s row after a login with ``password``, ``stored`` there before it."""
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("UPDATE users SET password_hash = %s WHERE id = %s", (stored, user_id))
        await login(password=password)
        await cur.execute("SELECT password_hash FROM users WHERE id = %s", (user_id,))
        (after,) = await cur.fetchone()
    return str(after)


@pytest.mark.parametrize(
    "old",
    [
        {"time_cost": 1, "memory_cost": 8192, "parallelism": 1},
        # Same strength, other timing: left as it was, a wrong password for
        # this account would answer in another time than an unknown name.
        {"time_cost": 2, "memory_cost": 19456, "parallelism": 2},
    ],
    ids=["weaker", "other lanes"],
)
async def test_an_old_hash_is_rehashed_at_login(
    client: Client, register: Register, login: Login, db: aiopg.Pool, old: HashParameters
) -> None:
    user = await register()
    rehashed = await hash_after_login(db, login, user["id"], PasswordHasher(**old).hash(PASSWORD))
    assert rehashed.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    await login()


async def test_a_hash_of_a_password_as_typed_before_normalization_still_logs_in_and_is_rehashed(
    client: Client, register: Register, login: Login, db: aiopg.Pool
) -> None:
    typed = "cafe\u0301 au lait, sans sucre"  # a decomposed "é", hashed as it came before NFKC
    user = await register()
    rehashed = await hash_after_login(db, login, user["id"], PasswordHasher(memory_cost=19456).hash(typed), typed)
    assert PasswordHasher().verify(rehashed, "caf\u00e9 au lait, sans sucre")  # the normalized form, from now on
    await login(password=typed)


async def test_a_password_as_typed_that_normalization_lengthens_past_the_limit_still_logs_in(
    client: Client, register: Register, login: Login, db: aiopg.Pool
) -> None:
    # Eight characters as typed, as registration counted them before NFKC;
    # 144 once normalized, which the login once refused with a 422 before
    # it could try the hash as typed.
    typed = "\ufdfa" * 8
    user = await register()
    rehashed = await hash_after_login(db, login, user["id"], PasswordHasher(memory_cost=19456).hash(typed), typed)
    assert PasswordHasher().verify(rehashed, normalized(typed))
    await login(password=typed)
    response = await client.post("/auth/login", json={"username": "ada", "password": "\ufdfa" * 7})
    assert response.status == 401


async def test_a_stronger_hash_is_kept_at_login(
    client: Client, register: Register, login: Login, db: aiopg.Pool
) -> None:
    # Made with more than the settings ask (say, before they were lowered):
    # a login must not quietly re-hash it with the weaker ones.
    user = await register()
    strong = PasswordHasher(time_cost=3, memory_cost=24576, parallelism=1).hash(PASSWORD)
    assert await hash_after_login(db, login, user["id"], strong) == strong


async def test_a_rehash_for_other_lanes_keeps_a_stronger_hash_strong(
    client: Client, register: Register, login: Login, db: aiopg.Pool
) -> None:
    # Two lanes where the settings say one: rehashed for the lanes, but with
    # its own memory and passes, not the settings' lower ones.
    user = await register()
    strong = PasswordHasher(time_cost=3, memory_cost=24576, parallelism=2).hash(PASSWORD)
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("UPDATE users SET password_hash = %s WHERE id = %s", (strong, user["id"]))
        await login()
        await cur.execute("SELECT password_hash FROM users WHERE id = %s", (user["id"],))
        (rehashed,) = await cur.fetchone()
    assert rehashed.startswith("$argon2id$v=19$m=24576,t=3,p=1$")
    await login()


async def test_a_rehash_does_not_overwrite_a_hash_changed_since_it_was_verified(
    client: Client, register: Register, db: aiopg.Pool
) -> None:
    user = await register()
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT password_hash FROM users WHERE id = %s", (user["id"],))
        (current,) = await cur.fetchone()
        verified_against = PasswordHasher(time_cost=1, memory_cost=8192).hash(PASSWORD)
        written = await repository.set_password_hash(db, user["id"], "$argon2id$stale", replacing=verified_against)
        await cur.execute("SELECT password_hash FROM users WHERE id = %s", (user["id"],))
        assert (written, await cur.fetchone()) == (False, (current,))
        assert await repository.set_password_hash(db, user["id"], "$argon2id$new", replacing=current)
