"""argon2id hashing off the event loop, and what makes a password acceptable.

argon2 is deliberately slow and memory-hungry (tens of milliseconds, 19 MiB),
so every hash and verify runs on a small thread pool: the C code releases
the GIL, and the event loop keeps answering other requests meanwhile. The
pool is kept smaller than the machine (one thread by default) and runs at
a lower CPU priority, so that a storm of logins queues for the pool instead
of starving everything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import threading
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources

import structlog
from argon2 import PasswordHasher, Type, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from argon2.low_level import ARGON2_VERSION

from .errors import HashingBusy
from .settings import PasswordPolicy

MIN_LENGTH = 8
MAX_LENGTH = 128  # characters once normalized: what the limits count
# As typed, before NFKC: decomposed, a password is up to three code points a
# character (Hangul typed as jamo), and this bounds the work of normalizing it.
MAX_TYPED_LENGTH = 4 * MAX_LENGTH
log = structlog.get_logger()


def lower_thread_priority(nice: int) -> None:
    """Run the calling thread at a lower CPU priority (a nice level).

    On Linux a nice level belongs to a thread, not to the whole process, so
    this slows only the hashing threads. Elsewhere it is a no-op.
    """
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


def normalized(password: str) -> str:
    """The password as it is hashed and checked: NFKC (NIST SP 800-63B, 5.1.1.2).

    One password typed on two devices may arrive composed (é) or decomposed
    (e and a combining accent), or in full-width forms. NFKC makes them one
    string, before the length and list checks too: "password1" in full-width
    letters is "password1", and four decomposed "é" are four characters, not
    eight.
    """
    return unicodedata.normalize("NFKC", password)


@dataclass(frozen=True, slots=True)
class Verdict:
    matched: bool
    # Matched a hash made before passwords were normalized: hash it again.
    as_typed: bool = False


class HashingSlots(asyncio.Semaphore):
    """Logins and registrations in progress at once; ``async with`` waits ``wait`` seconds at most, then a 503."""

    def __init__(self, slots: int, wait: float) -> None:
        super().__init__(slots)
        self.wait = wait

    async def __aenter__(self) -> None:
        try:
            async with asyncio.timeout(self.wait):
                await self.acquire()
        except TimeoutError:
            raise HashingBusy(headers={"Retry-After": "1"}) from None


def load_common_passwords() -> frozenset[str]:
    text = resources.files(__package__).joinpath("common_passwords.txt").read_text(encoding="utf-8")
    return frozenset(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


class Passwords:
    def __init__(self, policy: PasswordPolicy, executor: ThreadPoolExecutor, common: frozenset[str]) -> None:
        self._hasher = PasswordHasher(
            time_cost=policy.time_cost,
            memory_cost=policy.memory_cost_kib,
            parallelism=policy.parallelism,
            type=Type.ID,
        )
        self._executor = executor
        self._common = common
        self._dummy_hash = ""

    async def prepare(self) -> None:
        # A hash of a password nobody knows, with the current parameters: a
        # login for an unknown user is verified against it, so that it costs
        # what a wrong password for a real user costs.
        self._dummy_hash = await self.hash(secrets.token_urlsafe(32))

    async def hash(self, password: str) -> str:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._hasher.hash, normalized(password))

    async def verify(self, stored_hash: str | None, password: str) -> Verdict:
        """Whether ``password`` matches; ``None`` (no such user) is never a match, but costs the same."""
        # A login may be over MAX_LENGTH once normalized (a typed one from
        # before normalization, see validation.credentials): up to 18 times
        # its 128 characters, which only argon2's first BLAKE2b pass reads,
        # so it costs what any other verify costs, and does not match.
        form = normalized(password)
        if await self._verify(stored_hash, form):
            return Verdict(matched=True)
        if form == password:
            return Verdict(matched=False)
        # Hashes made before normalization hold the password as it was typed.
        # Tried for an unknown user too, so that both cost two hashes.
        return Verdict(matched=await self._verify(stored_hash, password), as_typed=True)

    async def _verify(self, stored_hash: str | None, password: str) -> bool:
        loop = asyncio.get_running_loop()
        candidate = stored_hash or self._dummy_hash
        try:
            matched = await loop.run_in_executor(self._executor, self._hasher.verify, candidate, password)
        except VerifyMismatchError:
            return False
        except (VerificationError, InvalidHashError):
            log.warning("password_hash_unreadable")
            return False
        return matched and stored_hash is not None

    def needs_rehash(self, stored_hash: str) -> bool:
        """True when ``stored_hash`` is weaker than what we hash with now.

        Not argon2's ``check_needs_rehash``, which is true for any difference:
        lowering the settings (still above the minimum) would then quietly
        weaken every stronger hash at its next login.
        """
        # Parses the parameters out of the hash string: cheap, fine on the loop.
        try:
            stored = extract_parameters(stored_hash)
        except InvalidHashError:
            return True
        wanted = self._hasher
        return (
            stored.type is not Type.ID
            or stored.version < ARGON2_VERSION
            or stored.time_cost < wanted.time_cost
            or stored.memory_cost < wanted.memory_cost
            # Lanes change the time a hash takes, not its strength: any
            # difference is rehashed, or a wrong password for an account
            # hashed before the change would answer in the old time for
            # ever, apart from the dummy hash an unknown name is checked against.
            or stored.parallelism != wanted.parallelism
        )

    async def rehash(self, password: str, stored_hash: str) -> str:
        """A new hash of ``password``, never weaker than ``stored_hash`` nor than the settings.

        The lanes are always the current ones (see ``needs_rehash``); memory
        and passes keep the higher of the two, so that a rehash for other
        lanes or for normalization does not quietly weaken a stronger hash.
        """
        wanted = self._hasher
        try:
            stored = extract_parameters(stored_hash)
        except InvalidHashError:
            hasher = wanted
        else:
            hasher = PasswordHasher(
                time_cost=max(stored.time_cost, wanted.time_cost),
                memory_cost=max(stored.memory_cost, wanted.memory_cost),
                parallelism=wanted.parallelism,
                type=Type.ID,
            )
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, hasher.hash, normalized(password))

    def weakness(self, password: str, *, username: str = "", email: str = "") -> str | None:
        """Why ``password`` is refused, or None when it is acceptable."""
        password = normalized(password[: MAX_TYPED_LENGTH + 1])
        if not MIN_LENGTH <= len(password) <= MAX_LENGTH:
            return f"must be {MIN_LENGTH} to {MAX_LENGTH} characters long"
        lowered = password.lower()
        if lowered in self._common:
            return "is too common; choose one that is not on lists of leaked passwords"
        # The email too in NFKC: an address may hold "ﬁ", kept as typed.
        if lowered in {username.lower(), normalized(email).lower()}:
            return "must not be your username or email"
        return None
