"""Login throttling per account, shared by every instance through Redis.

Each attempt takes a slot *before* the password is checked, in one Lua
script: atomic, so concurrent attempts on any number of instances can never
check more than ``max_failures`` passwords in any ``window_seconds``. The
window slides: a slot is a member of a sorted set, scored with Redis's own
clock, and it frees itself ``window_seconds`` after it was taken. A fixed
window (INCR, and a TTL from the first failure) let through twice the limit
across its edge: nine guesses just before the reset and ten just after. A
successful login gives its slot back, so only failures count; an attempt
refused with 429 takes no slot, so a guesser who keeps trying does not keep
the account locked for longer.

The key is the account, once the login name has found one: its username,
its email and any spelling PostgreSQL folds onto them (``ADA``, or ``adİ``
under a Unicode locale, where Python lowers the İ differently) share one
count. A name that finds no account is counted under PostgreSQL's fold of
it, so that exactly the spellings that would find one account share one
count, and unknown names are throttled exactly like real ones.

What that tells a guesser: that a username and an email share an account,
if they already have both and spend ten guesses on them. The answers and
their timing otherwise say nothing about which accounts exist.

The Redis key is an HMAC of the subject, keyed with a secret kept in
PostgreSQL (``load_throttle_key``), the same for every instance.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from dataclasses import dataclass

import aiopg
import redis.asyncio as aioredis
import redis.exceptions
import structlog

from .settings import ThrottlePolicy

log = structlog.get_logger()

# KEYS[1]: the account's slots. ARGV: the window (ms), the limit, this slot's id.
# Answers {1, 0} with the slot taken, or {0, ms until the oldest slot frees}.
_TAKE_SLOT = """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local window = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
    redis.call('ZADD', KEYS[1], now, ARGV[3])
    redis.call('PEXPIRE', KEYS[1], window)
    return {1, 0}
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, tonumber(oldest[2]) + window - now}
"""


@dataclass(frozen=True, slots=True)
class Attempt:
    allowed: bool
    retry_after: int
    key: str
    slot: str


async def load_throttle_key(pool: aiopg.Pool) -> bytes:
    """The secret every instance keys the throttle's hashes with; the first to ask makes it.

    Instances starting together agree: the losing INSERT waits for the
    winner's to commit, does nothing, and the SELECT after it (a statement
    of its own, so a snapshot taken since) reads the winner's secret.
    """
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "INSERT INTO login_throttle_key (secret) VALUES (%s) ON CONFLICT DO NOTHING", (secrets.token_bytes(32),)
        )
        await cur.execute("SELECT secret FROM login_throttle_key")
        row = await cur.fetchone()
    if row is None:  # deleted between the two statements, by hand
        raise RuntimeError("login_throttle_key has no row")
    return bytes(row[0])


class LoginThrottle:
    def __init__(self, redis: aioredis.Redis, policy: ThrottlePolicy, prefix: str, secret: bytes) -> None:
        self._redis = redis
        self._policy = policy
        self._prefix = prefix
        self._secret = secret
        self._take_slot = redis.register_script(_TAKE_SLOT)

    def _key(self, subject: str) -> str:
        # Keyed, not a bare SHA-256: what people type is sometimes a password
        # in the username box, and a bare hash of a common one is found again
        # by hashing common passwords. Without the secret, which never goes
        # to Redis, a key read from Redis tells nothing of what was typed.
        digest = hmac.new(self._secret, subject.encode(), hashlib.sha256).hexdigest()
        return f"{self._prefix}login-slots:{digest}"

    async def begin(self, folded: str, account: str | None) -> Attempt:
        """Take a slot for ``account`` (its id), or, when the login named none, for the login as PostgreSQL folds it."""
        return await self._begin(f"account:{account}" if account is not None else f"name:{folded}")

    async def begin_client(self, client_id: str, peer: str) -> Attempt:
        """Take a slot for a service client's secret, guessed from ``peer`` (an address).

        Per client *and* address, unlike an account's: ten wrong secrets
        from anyone must not lock the real service out of its tokens, and
        with it every call it makes to this one.
        """
        return await self._begin(f"client:{client_id}\n{peer}")

    async def _begin(self, subject: str) -> Attempt:
        key, slot = self._key(subject), secrets.token_hex(8)
        window_ms = self._policy.window_seconds * 1000
        taken, wait_ms = await self._take_slot(keys=[key], args=[window_ms, self._policy.max_failures, slot])
        return Attempt(allowed=bool(taken), retry_after=max(math.ceil(int(wait_ms) / 1000), 1), key=key, slot=slot)

    async def succeeded(self, attempt: Attempt) -> None:
        """Give the slot back: only failures count. Best effort, as the caller is let in either way."""
        try:
            await self._redis.zrem(attempt.key, attempt.slot)
        except redis.exceptions.RedisError as exc:
            # The slot stays taken: this success counts as a failure until the window ends.
            log.warning("login_throttle_give_back_failed", error=type(exc).__name__)
