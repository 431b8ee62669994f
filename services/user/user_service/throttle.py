"""Login throttling per account, shared by every instance through Redis.

Each attempt takes a slot *before* the password is checked, with INCR and
EXPIRE NX in one MULTI: atomic, so concurrent attempts on any number of
instances can never check more than ``max_failures`` passwords per window.
A successful login gives its slot back, so only failures count.

The key is the account, once the login name has found one: its username,
its email and any spelling PostgreSQL folds onto them (``ADA``, or ``adİ``
under a Unicode locale, where Python lowers the İ differently) share one
count. A name that finds no account is counted under PostgreSQL's fold of
it, so that exactly the spellings that would find one account share one
count, and unknown names are throttled exactly like real ones.

What that tells a guesser: that a username and an email share an account,
if they already have both and spend ten guesses on them. The answers and
their timing otherwise say nothing about which accounts exist.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import redis.asyncio as aioredis

from .settings import ThrottlePolicy

# Give a slot back only while its window lasts: a DECR on an expired key
# would create a key without a TTL, worth one free attempt forever.
_GIVE_BACK = """
if redis.call('EXISTS', KEYS[1]) == 1 then
    return redis.call('DECR', KEYS[1])
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Attempt:
    allowed: bool
    retry_after: int
    key: str


class LoginThrottle:
    def __init__(self, redis: aioredis.Redis, policy: ThrottlePolicy, prefix: str) -> None:
        self._redis = redis
        self._policy = policy
        self._prefix = prefix
        self._give_back = redis.register_script(_GIVE_BACK)

    def _key(self, folded: str, account: str | None) -> str:
        # Hashed, so that what people type (sometimes a password in the
        # username box) never lands in Redis in clear.
        subject = f"account:{account}" if account is not None else f"name:{folded}"
        digest = hashlib.sha256(subject.encode()).hexdigest()
        return f"{self._prefix}login-failures:{digest}"

    async def begin(self, folded: str, account: str | None) -> Attempt:
        """Take a slot for ``account`` (its id), or, when the login named none, for the login as PostgreSQL folds it."""
        key = self._key(folded, account)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, self._policy.window_seconds, nx=True)
            pipe.ttl(key)
            count, _, ttl = await pipe.execute()
        allowed = count <= self._policy.max_failures
        return Attempt(allowed=allowed, retry_after=max(int(ttl), 1), key=key)

    async def succeeded(self, attempt: Attempt) -> None:
        await self._give_back(keys=[attempt.key])
