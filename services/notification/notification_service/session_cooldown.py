"""After the server refuses to open a session with us, no new session for a while: a cooldown.

A login refused (``LoginRefused``) or TLS that fails (``TlsFailed``) is our
settings or the server's certificate to put right, and the next session
would be refused alike, a second or a minute later. Tried again for every
event of a backlog (32 in hand, and the retry queues bringing them back
after 1, 5 and 30 s), a wrong password cost hundreds of failed logins a
minute (two each: aiosmtplib tries every mechanism offered). Relays lock an
account after a few, some block the client's address too: the service
turned a typo in a password into a lockout that outlasted its fix.

So after such a refusal every send that needs a new session fails at once
with the same kind of error, without connecting: its event takes the path
it took before (the retry queues, a reminder deferred), only without a
login. When the cooldown is over, one send tries again: a session opened
ends it; refused, another begins, twice as long, up to ``LONGEST_COOLDOWN``.

One session opens at a time until one has opened: at start, and once a
cooldown is over. The other sends wait for it (within their attempt's
timeout, holding their session slot, which they could use for nothing
else), then open their own or fail as it did. Otherwise a backlog at start
would make ``SESSIONS`` failed logins at once, and so would the sends
waiting when a cooldown ends. Once a session has opened, sessions open side
by side; if the server refuses them from then on (the account's password
changed under a running service), those already opening may be refused too
(``SESSIONS`` at most) before the cooldown holds the others back.

Sessions already open go on being used, cooldown or not: they are logged
in, and reusing one makes no login the server could count against us.
Only a session opening is held back.

A transient failure (a refused connection, a timeout, 454 to AUTH) neither
begins a cooldown nor ends one: the server may be busy, not refusing us,
and the next send tries again.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog

from .replies import LoginRefused, TlsFailed

log = structlog.get_logger()

# Long enough that a wrong password costs one login a minute, not hundreds;
# short enough that email flows again within a minute of the relay being put
# right (an account unlocked, a certificate renewed). Our own settings change
# only with a restart, which starts without a cooldown.
COOLDOWN = 60.0
# Each refusal in a row doubles the cooldown, up to this: lockout policies
# count failures over 15 to 30 minutes, and a password that stays wrong
# overnight then costs four sessions an hour, not sixty.
LONGEST_COOLDOWN = 900.0

Refusal = LoginRefused | TlsFailed


class SessionCooldown:
    """Whether a session may be opened now, from how the last ones went: see the module's docstring."""

    def __init__(self) -> None:
        self._refusal: Refusal | None = None  # what began the cooldown, kept until a session opens
        self._until = 0.0  # time.monotonic() when the cooldown is over
        self._length = 0.0
        self._opened = False  # a session has opened since the start or the last refusal
        self._trying: asyncio.Event | None = None  # the one session opening, set when it ends

    @asynccontextmanager
    async def opening(self) -> AsyncIterator[None]:
        """Around opening a session: refused at once during a cooldown, one at a time until one opens.

        The block raises what the session's opening failed with, as
        ``replies.before_data`` makes it: a ``LoginRefused`` or a
        ``TlsFailed`` begins a cooldown.
        """
        while not self._opened:
            self._refuse_while_cooling_down()
            if self._trying is None:
                break
            await self._trying.wait()
        trying = None
        if not self._opened:
            self._trying = trying = asyncio.Event()
        try:
            yield
        except (LoginRefused, TlsFailed) as exc:
            self._refused(exc)
            raise
        else:
            self._open()
        finally:
            if trying is not None:
                self._trying = None
                trying.set()

    def _refuse_while_cooling_down(self) -> None:
        if self._refusal is None:
            return
        left = self._until - time.monotonic()
        if left > 0:
            raise type(self._refusal)(f"{self._refusal} (no new session for another {math.ceil(left)} s)")

    def _refused(self, exc: Refusal) -> None:
        now = time.monotonic()
        if self._refusal is not None and now < self._until:
            return  # a session that was opening when the cooldown began: refused alike, and part of it
        self._length = COOLDOWN if self._refusal is None else min(2 * self._length, LONGEST_COOLDOWN)
        self._refusal, self._until, self._opened = exc, now + self._length, False
        # Once for the cooldown: the events it fails each log their own retry.
        log.warning("smtp_cooldown_started", reason=type(exc).__name__, detail=str(exc), seconds=self._length)

    def _open(self) -> None:
        if self._refusal is not None:
            log.info("smtp_cooldown_ended", reason=type(self._refusal).__name__)
        self._refusal, self._opened = None, True
