"""Test sessions (pytest's, a benchmark's) that share one stack: several may run at once.

One starts the parts while the others wait for the stack's lock: two at
once both found the ports free and both started Consul and PostgreSQL.
Each then holds the sessions lock, shared, until it ends; the end of `task
test` (``down --unless-in-use``) asks it, and leaves the stack to any other
still running: it stopped the stack under their tests. The end-to-end tests
hold a lock of their own on the services in the same way.
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


@contextlib.contextmanager
def session(cfg: StackConfig, what: str = "test session") -> Iterator[None]:
    """The infrastructure up, and kept so (by any `down --unless-in-use`) until the block ends.

    The only session stops what an earlier one, killed, left running beside
    the infrastructure (the end-to-end tests' services): a todo-service's
    relay there published the rows the unit suites' tests wrote. Beside
    other sessions, they are left alone: they may be those sessions' own.
    """
    with lock.Users(cfg.run_dir, lock.SESSIONS) as users:
        with lock.held(cfg.run_dir, what, wait=WAIT):
            if users.join() and (left := stack.stop_mesh(cfg)):
                say(f"stopped what a test run before left running: {', '.join(left)}")
            stack.up_infra(cfg)
        yield


@contextlib.contextmanager
def mesh(cfg: StackConfig, what: str = "end-to-end tests") -> Iterator[None]:
    """Every service, the gateway and Envoy up for the block (in a ``session``), and stopped after it.

    Not stopped while another session's end-to-end tests use them still;
    but stopped otherwise, whatever runs next: their outbox relays would
    publish the rows other suites' tests write.
    """
    with lock.Users(cfg.run_dir, lock.MESH_USERS) as users:
        try:
            with lock.held(cfg.run_dir, what, wait=WAIT):
                users.join()
                stack.up(cfg)
            yield
        finally:
            # After a failed start too: what it started must not run on.
            with lock.held(cfg.run_dir, what, wait=WAIT):
                if users.leave():
                    stack.stop_mesh(cfg)
