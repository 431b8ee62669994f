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

After a leak of the table, neither will do: the next key leaked too, and
rotating makes the attacker's copy of it sign. ``replace_compromised_keys``
retires every key at once, the next one included, and makes new ones.

``python -m user_service rotate-keys [--compromised]`` and ``retire-keys`` run these.
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

from mesh_common.jwks import LEEWAY
from mesh_common.transactions import transaction

from .settings import TokenPolicy

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
LOCK_KEYS = "LOCK TABLE signing_keys IN SHARE ROW EXCLUSIVE MODE"
# Every verifier is mesh_common.jwks.JwksVerifier with its defaults: its key
# set is at most 300 s old (``max_key_age``), and it fetches again for an
# unknown kid only after a 5 s cool-down (``refresh_cooldown``). It takes a
# token up to ``LEEWAY`` (5 s) past its ``exp``.
VERIFIER_MAX_KEY_AGE = 300.0
VERIFIER_COOLDOWN = 5.0
VERIFIER_LEEWAY = float(LEEWAY)
# For an instance's re-read of the keys that is slow, or failed a few times
# (a failed one is tried again within 5 s: contexts.REFRESH_RETRY).
PUBLICATION_MARGIN = 25.0


def next_key_min_age(policy: TokenPolicy) -> float:
    """How long a next key must have been in the table before it may sign.

    A key made elsewhere (by another instance, or the CLI) is in an
    instance's JWKS only once that instance re-reads the table, up to
    ``key_refresh_interval`` later; from then on, every verifier has it
    within its key set's age and cool-down. Six minutes at the default 30 s.
    """
    return policy.key_refresh_interval + VERIFIER_MAX_KEY_AGE + VERIFIER_COOLDOWN + PUBLICATION_MARGIN


def retiring_min_age(policy: TokenPolicy) -> float:
    """How long after it stopped signing a key may be retired.

    Instances sign with it until they re-read the table, up to
    ``key_refresh_interval`` after the rotation, or the margin more when that
    re-read is slow or fails for a few seconds; what it signed last lives as long as the
    longer-lived kind of token (a service token may outlive a user's: nothing
    keeps SERVICE_TOKEN_TTL under ACCESS_TOKEN_TTL), and verifiers take it
    for their leeway past its ``exp``. 11 minutes at the defaults.
    """
    longest = max(policy.access_ttl, policy.service_ttl)
    return longest + policy.key_refresh_interval + PUBLICATION_MARGIN + VERIFIER_LEEWAY


NEXT_KEY_MIN_AGE = next_key_min_age(TokenPolicy())


class KeyChangeRefused(Exception):
    """A rotation or retirement that would cut valid tokens short (``--force`` overrides)."""


async def ensure_keys(pool: aiopg.Pool) -> None:
    """Make sure there is an active key and a next one.

    With no active key but a next one (the active row was deleted), the next
    key is promoted: it is published already, where a new one is not. The
    table lock makes instances starting together agree.
    """
    async with transaction(pool) as cur:
        await cur.execute(LOCK_KEYS)
        await cur.execute("SELECT state FROM signing_keys WHERE state IN ('active', 'next')")
        states = {row[0] for row in await cur.fetchall()}
        if "active" not in states and "next" in states:
            await cur.execute("UPDATE signing_keys SET state = 'active' WHERE state = 'next' RETURNING kid")
            log.warning("signing_key_promoted", kid=(await cur.fetchone())[0], reason="no active key")
            states = {"active"}
        for state in ("active", "next"):
            if state not in states:
                kid, pem = _new_key_row()
                await cur.execute(INSERT_KEY, (kid, pem, state))
                log.info("signing_key_created", kid=kid, state=state)


async def rotate_keys(pool: aiopg.Pool, *, min_published: float = NEXT_KEY_MIN_AGE, force: bool = False) -> str:
    """The next key becomes active, the active one retiring; a new next key is made. Returns the active kid.

    Refused (``KeyChangeRefused``) while the next key has been published for
    less than ``min_published`` seconds (``next_key_min_age``): some verifier
    may not have fetched it yet, and would answer its tokens with a 401. Two
    rotations in a row are refused so. ``force`` rotates anyway, an
    unpublished key included.
    """
    async with transaction(pool) as cur:
        # Two rotations at once would otherwise both retire the same key and
        # then collide on the one-active index.
        await cur.execute(LOCK_KEYS)
        await cur.execute(
            "SELECT kid, extract(epoch FROM now() - created_at)::float8 FROM signing_keys WHERE state = 'next'"
        )
        row = await cur.fetchone()
        if not force:
            if row is None:
                raise KeyChangeRefused(
                    "there is no next key to rotate to: ensure_keys publishes one; --force rotates anyway"
                )
            if row[1] < min_published:
                raise KeyChangeRefused(
                    f"the next key was published {row[1]:.0f} s ago; verifiers may not have it yet:"
                    f" rotate after {min_published - row[1]:.0f} s more, or --force"
                )
        await cur.execute("UPDATE signing_keys SET state = 'retiring', retiring_at = now() WHERE state = 'active'")
        if row is not None:
            kid = str(row[0])
            await cur.execute("UPDATE signing_keys SET state = 'active' WHERE kid = %s", (kid,))
        else:
            kid, pem = _new_key_row()
            await cur.execute(INSERT_KEY, (kid, pem, "active"))
        await cur.execute(INSERT_KEY, (*_new_key_row(), "next"))
    log.info("signing_key_rotated", kid=kid, forced=force)
    return kid


async def replace_compromised_keys(pool: aiopg.Pool) -> str:
    """Retire every key that may have leaked, then make a new active and next key. Returns the active kid.

    Any copy of the table holds the next key, published already: rotating to
    it, or deleting the active row (``ensure_keys`` promotes it), would make
    the copy sign for real, any subject a service's included. So the next
    and retiring keys go with the active one, in one transaction, and every
    token signed before is refused. The new active key signs unpublished:
    there is no waiting for verifiers to fetch it while a leaked key signs.
    """
    async with transaction(pool) as cur:
        # The lock ensure_keys and rotate_keys take: an instance starting
        # meanwhile finds the new keys, and makes none of its own.
        await cur.execute(LOCK_KEYS)
        await cur.execute(
            "UPDATE signing_keys SET state = 'retired', retired_at = now() WHERE state <> 'retired' RETURNING kid"
        )
        withdrawn = sorted(str(row[0]) for row in await cur.fetchall())
        kid, pem = _new_key_row()
        await cur.execute(INSERT_KEY, (kid, pem, "active"))
        await cur.execute(INSERT_KEY, (*_new_key_row(), "next"))
    log.warning("signing_keys_replaced", kid=kid, retired=withdrawn, reason="compromised")
    return kid


async def retire_keys(
    pool: aiopg.Pool, kid: str | None = None, *, min_retiring: float = 0.0, force: bool = False
) -> list[str]:
    """Take retiring keys (all, or just ``kid``) out of the JWKS. Returns their kids.

    Only keys that stopped signing ``min_retiring`` seconds ago or more
    (``retiring_min_age``) unless ``force``: retired sooner, they cut valid
    tokens short.
    ``KeyChangeRefused`` when ``kid`` is not retiring, or when every retiring
    key is too recent.
    """
    async with transaction(pool) as cur:
        await cur.execute(LOCK_KEYS)
        await cur.execute(
            "SELECT kid, coalesce(extract(epoch FROM now() - retiring_at)::float8, 'Infinity') FROM signing_keys"
            " WHERE state = 'retiring' AND (%(kid)s::text IS NULL OR kid = %(kid)s)",
            {"kid": kid},
        )
        retiring = dict(await cur.fetchall())
        retired = sorted(k for k, age in retiring.items() if force or age >= min_retiring)
        if retired:
            await cur.execute(
                "UPDATE signing_keys SET state = 'retired', retired_at = now() WHERE kid = ANY(%s)", (retired,)
            )
    kept = sorted(retiring.keys() - set(retired))
    log.info("signing_keys_retired", kids=retired, kept=kept)
    if kid is not None and not retiring:
        raise KeyChangeRefused(f"{kid} is not a retiring key")
    if kept and not retired:
        raise KeyChangeRefused(
            f"{', '.join(kept)} stopped signing less than {min_retiring:.0f} s ago: tokens it signed may still be"
            " valid; --force retires anyway"
        )
    return retired


class KeyStore:
    """The next, active and retiring keys, parsed once and re-read on ``load``."""

    def __init__(self, pool: aiopg.Pool) -> None:
        self._pool = pool
        self._keys: dict[str, SigningKey] = {}
        # Parsed keys by their PEM, not their kid: a key replaced under its
        # kid (a restore, a repair after a leak) signs and is published as
        # the new one, as on an instance started since.
        self._parsed: dict[str, Ed25519PrivateKey] = {}

    async def load(self) -> None:
        rows = await self._read()
        if {"active", "next"} - {state for _, _, state in rows}:
            # Start-up creates both and rotation replaces both, so only a
            # deleted row gets here: repair it now rather than fail every
            # login (or the next rotation) until a restart.
            await ensure_keys(self._pool)
            rows = await self._read()
        parsed = {pem: self._parsed.get(pem) or _parse_private_key(pem) for _, pem, _ in rows}
        self._keys = {kid: SigningKey(kid, parsed[pem], state) for kid, pem, state in rows}
        self._parsed = parsed

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
