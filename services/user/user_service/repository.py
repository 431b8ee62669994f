"""Accounts in PostgreSQL: every SQL statement about users is here."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import aiopg
from psycopg2 import errors

PROFILE = "id, username, email, display_name, created_at, email_verified_at, last_verified_email"
UPDATABLE = frozenset({"display_name", "email"})


class AccountTaken(Exception):
    """The username or the email is already taken (which one is not said)."""


class Credentials(NamedTuple):
    """What a password is checked against, and the sessions it would start."""

    user_id: str
    password_hash: str
    # Moved on to end every session of the account (migration 0015): a
    # session started under an earlier epoch refreshes no more.
    session_epoch: int


@dataclass(frozen=True, slots=True)
class User:
    id: str
    username: str
    email: str
    display_name: str
    created_at: datetime
    email_verified_at: datetime | None
    # The last address the account proved, while ``email`` is unverified
    # (migration 0016); never shown to a client, only told of changes.
    last_verified_email: str | None

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> User:
        user_id, username, email, display_name, created_at, verified_at, last_verified = row
        return cls(str(user_id), username, email, display_name, created_at, verified_at, last_verified)

    @property
    def email_verified(self) -> bool:
        return self.email_verified_at is not None

    def profile(self) -> dict[str, str | bool]:
        """What a client may see: never the password hash, which is not even loaded."""
        return {
            "id": self.id,
            "username": self.username,
            "email": self.email,
            "display_name": self.display_name,
            "created_at": self.created_at.isoformat(),
            "email_verified": self.email_verified,
        }


async def insert_user(cur: Any, *, username: str, email: str, display_name: str, password_hash: str) -> User:
    try:
        await cur.execute(
            "INSERT INTO users (username, email, display_name, password_hash)"
            f" VALUES (%s, %s, %s, %s) RETURNING {PROFILE}",
            (username, email, display_name, password_hash),
        )
    except errors.UniqueViolation:
        raise AccountTaken() from None
    return User.from_row(await cur.fetchone())


async def find_credentials(pool: aiopg.Pool, login: str) -> tuple[str, Credentials | None]:
    """``login`` as PostgreSQL folds its case, and the credentials of the account it names, if any.

    The fold comes from PostgreSQL because it decides which spellings find
    an account: Python's ``lower()`` differs on "İ", and an unknown name
    counted under Python's fold would be throttled apart from its spellings
    when a known one is not, which tells the two apart.
    """
    async with pool.acquire() as conn, conn.cursor() as cur:
        # Usernames cannot contain "@" and emails must, so at most one row matches.
        await cur.execute(
            "SELECT lower(%(login)s), found.id, found.password_hash, found.session_epoch"
            " FROM (VALUES (1)) AS one LEFT JOIN LATERAL (SELECT id, password_hash, session_epoch FROM users"
            " WHERE lower(username) = lower(%(login)s) OR lower(email) = lower(%(login)s) LIMIT 1) AS found ON true",
            {"login": login},
        )
        folded, user_id, password_hash, epoch = await cur.fetchone()
    return folded, (Credentials(str(user_id), password_hash, epoch) if user_id is not None else None)


async def credentials_of(pool: aiopg.Pool, user_id: str) -> tuple[User, Credentials] | None:
    """The account and its credentials, for a change that the current password must prove."""
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(f"SELECT {PROFILE}, password_hash, session_epoch FROM users WHERE id = %s", (user_id,))
        row = await cur.fetchone()
    if row is None:
        return None
    user = User.from_row(row[:-2])
    return user, Credentials(user.id, row[-2], row[-1])


async def get_user(pool: aiopg.Pool, user_id: str) -> User | None:
    async with pool.acquire() as conn, conn.cursor() as cur:
        return await fetch_user(cur, user_id)


async def fetch_user(cur: Any, user_id: str, *, for_update: bool = False) -> User | None:
    """The account; ``for_update``, locked until the transaction ``cur`` is in ends."""
    await cur.execute(f"SELECT {PROFILE} FROM users WHERE id = %s{' FOR UPDATE' if for_update else ''}", (user_id,))
    row = await cur.fetchone()
    return User.from_row(row) if row else None


async def update_user(cur: Any, user: User, changes: dict[str, str]) -> User:
    """Apply ``changes`` (display_name and/or email, already validated) to ``user``, locked by ``fetch_user``.

    A new address is unverified: whatever proved the old one does not prove
    it. Any textual change counts, case too: the verified spelling is the
    one mail went to. The old address, if it was verified, is kept as the
    last one proven, and one kept already stays through changes between
    unverified addresses: the owner is told there.
    """
    if not changes.keys() <= UPDATABLE:
        raise ValueError(f"not updatable: {sorted(changes.keys() - UPDATABLE)}")
    assignments = [f"{column} = %({column})s" for column in sorted(changes)]
    if changes.get("email", user.email) != user.email:
        # The right-hand sides read the row as it was before this UPDATE.
        assignments.append(
            "email_verified_at = NULL, last_verified_email ="
            " CASE WHEN email_verified_at IS NULL THEN last_verified_email ELSE email END"
        )
    try:
        await cur.execute(
            f"UPDATE users SET {', '.join(assignments)}, updated_at = now() WHERE id = %(id)s RETURNING {PROFILE}",
            {**changes, "id": user.id},
        )
    except errors.UniqueViolation:
        raise AccountTaken() from None
    return User.from_row(await cur.fetchone())


async def set_password_hash(pool: aiopg.Pool, user_id: str, password_hash: str, *, replacing: str) -> bool:
    """Store a rehash of the password, if the hash it was verified against is still the one stored.

    A login verifies, then hashes for tens of milliseconds before it writes:
    whatever changed the hash meanwhile (another instance with other lanes,
    a password change) has the last word. False when it did.
    """
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "UPDATE users SET password_hash = %s WHERE id = %s AND password_hash = %s",
            (password_hash, user_id, replacing),
        )
        return bool(cur.rowcount)


async def change_password(cur: Any, user_id: str, password_hash: str, *, replacing: str) -> int | None:
    """Store a new password, ending every session: the new session epoch, or None if the hash changed meanwhile.

    ``replacing`` is the hash the current password was checked against:
    another change in between (on any instance) is not overwritten unseen.
    """
    await cur.execute(
        "UPDATE users SET password_hash = %s, session_epoch = session_epoch + 1, updated_at = now()"
        " WHERE id = %s AND password_hash = %s RETURNING session_epoch",
        (password_hash, user_id, replacing),
    )
    row = await cur.fetchone()
    return row[0] if row else None


async def end_sessions(pool: aiopg.Pool, user_id: str) -> bool:
    """Move the account's session epoch on, so that no refresh token issued before it works; False if it is gone."""
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("UPDATE users SET session_epoch = session_epoch + 1 WHERE id = %s", (user_id,))
        return bool(cur.rowcount)
