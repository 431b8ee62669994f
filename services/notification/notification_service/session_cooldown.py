"""After the server refuses us before DATA, no new session for a while: a cooldown.

A login refused (``LoginRefused``), TLS that fails (``TlsFailed``), or a
5xx of ours to the envelope (a blocklist: "550 5.7.1 ... client blocked
using zen.spamhaus.org"; a quota: "550 5.4.5 Daily user sending limit
exceeded") is our settings, our certificate or our standing with the relay
to put right, and the next session would be refused alike, a second or a
minute later. Tried again for every event of a backlog (32 in hand, and the
retry queues bringing them back after 1, 5 and 30 s), a wrong password cost
hundreds of failed logins a minute (two each: aiosmtplib tries every
mechanism offered), and a blocked account as many sessions a second, each
connecting, logging in and naming a recipient. Relays lock an account after
a few, some block the client's address too: the service turned a typo in a
password into a lockout that outlasted its fix.

So after such a refusal every send that needs a new session fails at once
with the same kind of error, without connecting: its event takes the path
it took before (the retry queues, a reminder deferred), only without a
session. When the cooldown is over, one send tries again: a session whose
envelope the server takes (its DATA begins) ends it; refused, another
begins, twice as long, up to ``LONGEST_COOLDOWN``.

Which refusals begin one: any ``RefusedUs`` while the session opens (the
greeting, EHLO, STARTTLS, AUTH) or to MAIL FROM, which names no recipient,
at once. At RCPT, once two mailboxes have been refused so with no envelope
taken in between: a block of ours refuses every recipient, while a
relay's policy about one address (or one domain) may carry the same status
(Postfix's access maps answer "554 5.7.1 ... Recipient address rejected:
Access denied"), and one user's address must not hold back everyone's
email. Once the relay has taken an envelope after refusing a mailbox, with
no cooldown between, that mailbox is known to be refused alone, and counts
no more: retried for a day, two such addresses would otherwise begin a
cooldown whenever they came up one after the other. Two such addresses,
new and one right after the other, still begin one, as a block's first
refusals do; but the mailboxes that began a cooldown begin no other
between them, and refusals during one make no suspects. Otherwise two
users' addresses refused alone, retried every 30 s, began cooldown after
cooldown, doubled, for a day: the trial send after each, refused alone,
was the second of two. After a cooldown, a mailbox not among those that
began it, refused, begins the next (a block refuses everyone); those that
did, tried again first (a backlog retried in its order), cost a block one
session each more: both are refused alike, by a block or each alone. The
envelope taken after a cooldown may be a block lifted: nothing is learnt
of the mailboxes from before it, only of those refused since.
A refusal at DATA, about the message (DMARC, content policy), begins none.

One session opens at a time until one has had its envelope taken: at start,
and once a cooldown is over. The other sends wait for it (within their
attempt's timeout, holding their session slot, which they could use for
nothing else), then open their own or fail as it did. Otherwise a backlog at
start would make ``SESSIONS`` failed logins at once, and so would the sends
waiting when a cooldown ends. A send that fails otherwise (an outage, a
recipient refused for good) hands the turn to the next. Once one has had
its envelope taken, sessions open side by side; if the server refuses them
from then on (the account's password changed under a running service),
those already opening may be refused too (``SESSIONS`` at most) before
the cooldown holds the others back.

Sessions already open go on being used, cooldown or not: they are logged
in, and reusing one makes no login the server could count against us. Only
a session opening is held back; one refused is closed, so a block costs
each open session one refusal at most.

A transient failure (a refused connection, a timeout, a 4xx) neither begins
a cooldown nor ends one: the server may be busy, not refusing us, and the
next send tries again.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

import structlog

from .replies import LoginRefused, RefusedUs, TlsFailed

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
# Mailboxes kept of each kind (refused since an envelope was taken; known
# to be refused alone): more than a block lets through between two
# cooldowns, or than the addresses a relay refuses alone in a day, and few
# enough to hold.
MAILBOXES_KEPT = 1000

# Called when the server takes the envelope: DATA begins.
Taken = Callable[[], None]


class SessionCooldown:
    """Whether a session may be opened now, from how the last ones went: see the module's docstring."""

    def __init__(self) -> None:
        self._refusal: RefusedUs | None = None  # what began the cooldown, kept until an envelope is taken
        self._until = 0.0  # time.monotonic() when the cooldown is over
        self._length = 0.0
        self._proven = False  # a new session has had its envelope taken since the start or the last refusal
        self._trying: asyncio.Event | None = None  # the one session opening, set when its turn ends
        # Mailboxes refused at RCPT, for a reason of ours, since an envelope was taken or a cooldown began.
        self._suspects: set[str] = set()
        self._cooled: set[str] = set()  # the new suspects that began the last cooldown, until an envelope is taken
        self._refused_alone: OrderedDict[str, None] = OrderedDict()  # refused while others' envelopes were taken

    @asynccontextmanager
    async def opening(self) -> AsyncIterator[Taken]:
        """Around a new session, from opening it to DATA: refused at once during a cooldown, one at a time until proven.

        Yields what to call when the server takes the envelope. The block
        raises what the send failed with, as ``replies.before_data`` makes
        it: a ``RefusedUs`` until then may begin a cooldown.
        """
        while not self._proven:
            self._refuse_while_cooling_down()
            if self._trying is None:
                break
            await self._trying.wait()
        trying = None
        if not self._proven:
            self._trying = trying = asyncio.Event()
        taken = False

        def envelope_taken() -> None:
            nonlocal taken, trying
            taken = True
            self._envelope_taken()
            if trying is not None:  # only the send whose turn it was proves the server takes us
                self._proven = True
                if self._refusal is not None:
                    log.info("smtp_cooldown_ended", reason=type(self._refusal).__name__)
                    self._refusal = None
                self._end_turn(trying)
                trying = None

        try:
            yield envelope_taken
        except RefusedUs as exc:
            if not taken:
                self._refused(exc)
            raise
        finally:
            if trying is not None:
                self._end_turn(trying)

    @contextmanager
    def reusing(self) -> Iterator[Taken]:
        """Around a send on a session already open, to DATA: it opens nothing, but what it meets counts."""
        taken = False

        def envelope_taken() -> None:
            nonlocal taken
            taken = True
            self._envelope_taken()

        try:
            yield envelope_taken
        except RefusedUs as exc:
            if not taken:
                self._refused(exc)
            raise

    def _envelope_taken(self) -> None:
        # The relay takes others' envelopes: the suspects are refused alone.
        # None of them is from before a cooldown (emptied when it began): the
        # envelope taken then may be a block lifted.
        for mailbox in self._suspects:
            self._refused_alone[mailbox] = None
            self._refused_alone.move_to_end(mailbox)
        while len(self._refused_alone) > MAILBOXES_KEPT:
            self._refused_alone.popitem(last=False)
        self._suspects.clear()
        self._cooled.clear()

    def _end_turn(self, trying: asyncio.Event) -> None:
        self._trying = None
        trying.set()

    def _refuse_while_cooling_down(self) -> None:
        if self._refusal is None:
            return
        left = self._until - time.monotonic()
        if left > 0:
            # Of the same kind, for the event's retry log: LoginRefused, TlsFailed, or a bare RefusedUs.
            kind = type(self._refusal) if isinstance(self._refusal, LoginRefused | TlsFailed) else RefusedUs
            raise kind(f"{self._refusal} (no new session for another {math.ceil(left)} s)")

    def _refused(self, exc: RefusedUs) -> None:
        now = time.monotonic()
        if self._refusal is not None and now < self._until:
            # A session that was opening when the cooldown began, or one open
            # reused: refused alike, and part of it. Not a suspect either:
            # kept, a mailbox refused alone would make the trial send after
            # the cooldown, refused alone too, the second of two.
            return
        if exc.recipients:
            suspects = exc.recipients - self._refused_alone.keys()
            # Those that began the last cooldown count as refused, but only a
            # new one begins the next: refused again, each may be refused alone.
            others = (self._suspects | self._cooled) - suspects
            if len(self._suspects) < MAILBOXES_KEPT:
                self._suspects |= suspects
            if not (suspects - self._cooled and others):
                return  # perhaps a policy about this recipient alone: its event is retried, nobody else's held
        self._length = COOLDOWN if self._refusal is None else min(2 * self._length, LONGEST_COOLDOWN)
        self._refusal, self._until, self._proven = exc, now + self._length, False
        # Those that began it begin no other between them: after it, two
        # mailboxes each refused alone, retried every 30 s, would otherwise
        # begin the next one with a single refusal, and again, doubled, for a
        # day. Only those new to this one: the others have had their turn,
        # and a block tried again in the same order would cost ever more.
        self._cooled = self._suspects - self._cooled
        self._suspects = set()
        # Once for the cooldown: the events it fails each log their own retry.
        log.warning("smtp_cooldown_started", reason=type(exc).__name__, detail=str(exc), seconds=self._length)
