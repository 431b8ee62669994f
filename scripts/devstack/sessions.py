"""Test sessions (pytest's, a benchmark's) on one test stack: they take turns, whole run after whole run.

It is the data that cannot be shared, not the processes. Every run uses the
same test databases, and each test starts by emptying them: it truncates
the tables and flushes the Redis databases, an end-to-end test stops
RabbitMQ for a while, a crash test registers a todo-service in Consul. Two
runs at once fail each other's tests (one's count of the outbox rows it
wrote, as the other truncates them), and a benchmark beside a test run has
its rows truncated mid-measurement, its figures disturbed besides. So a
session holds the stack's turn (``lock.turn``) from its start to its end,
and another waits for it, saying for whom, up to ``TURN_WAIT``. The turn is
an flock: a holder killed outright (SIGKILL) holds it no more. A pytest run
takes its turn before its first test (the root conftest.py). `task bench`
takes one turn for all its benchmarks (`devstack turn`), each a process and
a session of its own in it, so that a test run waiting for its turn comes
after the last of them, not between two.

A session is a user of the stack (``lock.Users``) from the start of its
wait: the end of `task test` or `task bench` (``down --unless-in-use``)
leaves the stack running for the next run, rather than stopping what it
would start again; a `task down` typed by hand stops it all the same.

The session whose turn it is runs alone: whatever runs beside the
infrastructure as it starts (end-to-end services) a killed run left, and it
stops it: a todo-service's relay there published the rows the unit suites'
tests wrote.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from . import lock, stack
from .config import StackConfig
from .procs import say

# How long a session waits for the stack's lock: another's start of the
# infrastructure or of the services, or a `down`, ends within it as a rule.
WAIT = 2 * stack.READY_TIMEOUT
# How long a session waits for its turn: a whole `task test` takes about 8
# minutes here and `task bench` about 8, so a run or two queued ahead end
# within it; a holder suspended (Ctrl-Z) or hung keeps it no longer.
TURN_WAIT = 30 * 60.0


@contextlib.contextmanager
def turn(cfg: StackConfig, what: str = "test session", *, wait: float | None = None) -> Iterator[None]:
    """The stack's turn, for the block, as ``what``: waited for (up to ``wait`` s, or TURN_WAIT) as one of its users.

    Re-entered by the thread that holds it (pytest's ``infra`` fixture, in
    the turn the root conftest took), it is the same turn.
    """
    with lock.Users(cfg.run_dir, lock.SESSIONS) as users:
        with lock.held(cfg.run_dir, what, wait=WAIT):
            users.join()
        with lock.turn(cfg.run_dir, what, wait=TURN_WAIT if wait is None else wait):
            yield


@contextlib.contextmanager
def session(cfg: StackConfig, what: str = "test session", *, wait: float | None = None) -> Iterator[None]:
    """The infrastructure up, in this run's turn, for the block; a killed run's services stopped."""
    with turn(cfg, what, wait=wait):
        with lock.held(cfg.run_dir, what, wait=WAIT):
            if left := stack.stop_mesh(cfg):
                say(f"stopped what a test run before left running: {', '.join(left)}")
            stack.up_infra(cfg)
        yield


@contextlib.contextmanager
def mesh(cfg: StackConfig, what: str = "end-to-end tests") -> Iterator[None]:
    """Every service, the gateway and Envoy up for the block (in a ``session``), and stopped after it.

    Stopped whatever runs next in the session: their outbox relays would
    publish the rows other suites' tests write.
    """
    try:
        with lock.held(cfg.run_dir, what, wait=WAIT):
            stack.up(cfg)
        yield
    finally:
        # After a failed start too: what it started must not run on.
        with lock.held(cfg.run_dir, what, wait=WAIT):
            stack.stop_mesh(cfg)
