"""The Ed25519 keys tokens are signed with: kept in the database, cached here.

Every instance signs with the one ``active`` key of the shared table, so a
token from any instance verifies on every other. The key that will sign
next is published first: a ``next`` key is in the JWKS from when it is made,
so every verifier has fetched it long before a token names it. (Published
only at rotation, a new key was unknown for up to the verifiers' refresh
cool-down to any verifier that had fetched just before: valid tokens got a
401, and a client that sees one logs its user out.) Rotation is two steps,
apart by at least an access-token lifetime:

1. ``rotate_keys``: the next key becomes active, and a new next key is made;
   the old active key turns ``retiring``, which signs nothing but stays in
   the JWKS, so tokens it signed still verify.
2. ``retire_keys``: retiring keys leave the JWKS; tokens they signed are refused.

``python -m user_service rotate-keys`` and ``retire-keys`` run these.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import aiopg
import jwt
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mesh_common.transactions import transaction

ALGORITHM = "EdDSA"
log = structlog.get_logger()


class NoActiveKey(RuntimeError):
    """The key table has no active key: start-up did not run ``ensure_active_key``."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    private_key: Ed25519PrivateKey
    state: str

    def public_jwk(self) -> dict[str, Any]:
        jwk = jwt.algorithms.OKPAlgorithm.to_jwk(self.private_key.public_key(), as_dict=True)
        return {**jwk, "kid": self.kid, "alg": ALGORITHM, "use": "sig"}


def _new_key_row() -> tuple[str, str]:
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return uuid.uuid4().hex[:16], pem.decode()


INSERT_KEY = "INSERT INTO signing_keys (kid, private_key_pem, state) VALUES (%s, %s, %s)"


async def ensure_keys(pool: aiopg.Pool) -> None:
    """Create the active key and the next one, unless there are.

    Two instances starting on an empty table both try; the partial unique
    indexes let exactly one insert of each win and the other do nothing.
    """
    async with pool.acquire() as conn, conn.cursor() as cur:
        for state in ("active", "next"):
            await cur.execute(
                INSERT_KEY + " ON CONFLICT (state) WHERE state = %s DO NOTHING RETURNING kid",
                (*_new_key_row(), state, state),
            )
            created = await cur.fetchone()
            if created:
                log.info("signing_key_created", kid=created[0], state=state)


async def rotate_keys(pool: aiopg.Pool) -> str:
    """The next key becomes active, the active one retiring; a new next key is made. Returns the active kid."""
    async with transaction(pool) as cur:
        # Two rotations at once would otherwise both retire the same key and
        # then collide on the one-active index.
        await cur.execute("LOCK TABLE signing_keys IN SHARE ROW EXCLUSIVE MODE")
        await cur.execute("UPDATE signing_keys SET state = 'retiring' WHERE state = 'active'")
        await cur.execute("UPDATE signing_keys SET state = 'active' WHERE state = 'next' RETURNING kid")
        promoted = await cur.fetchone()
        if promoted:
            kid = str(promoted[0])
        else:
            # No next key (its row was deleted): an unpublished key signs,
            # which is what rotation did before next keys existed.
            kid, pem = _new_key_row()
            await cur.execute(INSERT_KEY, (kid, pem, "active"))
        await cur.execute(INSERT_KEY, (*_new_key_row(), "next"))
    log.info("signing_key_rotated", kid=kid, published_before=promoted is not None)
    return kid


async def retire_keys(pool: aiopg.Pool, kid: str | None = None) -> list[str]:
    """Take retiring keys (all, or just ``kid``) out of the JWKS. Returns their kids."""
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "UPDATE signing_keys SET state = 'retired', retired_at = now()"
            " WHERE state = 'retiring' AND (%(kid)s::text IS NULL OR kid = %(kid)s) RETURNING kid",
            {"kid": kid},
        )
        retired = [row[0] for row in await cur.fetchall()]
    log.info("signing_keys_retired", kids=retired)
    return retired


class KeyStore:
    """The next, active and retiring keys, parsed once and re-read on ``load``."""

    def __init__(self, pool: aiopg.Pool) -> None:
        self._pool = pool
        self._keys: dict[str, SigningKey] = {}

    async def load(self) -> None:
        rows = await self._read()
        if not any(state == "active" for _, _, state in rows):
            # Start-up creates the active key and rotation replaces it, so
            # only a deleted row gets here: make a new key rather than fail
            # every login until a restart.
            await ensure_keys(self._pool)
            rows = await self._read()
        keys = {}
        for kid, pem, state in rows:
            known = self._keys.get(kid)
            private_key = known.private_key if known else _parse_private_key(pem)
            keys[kid] = SigningKey(kid, private_key, state)
        self._keys = keys

    async def _read(self) -> list[tuple[str, str, str]]:
        async with self._pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                "SELECT kid, private_key_pem, state FROM signing_keys"
                " WHERE state IN ('next', 'active', 'retiring') ORDER BY created_at"
            )
            return list(await cur.fetchall())

    @property
    def active(self) -> SigningKey:
        for key in self._keys.values():
            if key.state == "active":
                return key
        raise NoActiveKey()

    def jwks(self) -> dict[str, Any]:
        return {"keys": [key.public_jwk() for key in self._keys.values()]}


def _parse_private_key(pem: str) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise TypeError("signing keys must be Ed25519")
    return key
