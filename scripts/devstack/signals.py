"""The signals that stop the stack's runner: Ctrl-C, SIGTERM, and a closed terminal's SIGHUP.

``up`` turns each into an exception (``Interrupted``) while it starts the
stack, so that it stops what it has started; ``held_back`` keeps one from
landing between a child's start and its pid file.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A signal to stop (Ctrl-C, SIGTERM or a closed terminal's SIGHUP) that came while ``up`` ran."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def interrupt_on_signals() -> None:
    """Make SIGTERM and SIGHUP raise as Ctrl-C does, so that ``up`` stops what it started.

    Left to their default, either ended this process alone, and the processes
    started so far (in sessions of their own) ran on with no one to stop them.
    """

    def interrupt(signum: int, _: object) -> None:
        ignore_signals()  # the teardown this starts is not cut short by the next one
        raise Interrupted(signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, interrupt)


def ignore_signals() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda *_: None)


@contextlib.contextmanager
def held_back() -> Iterator[None]:
    """Run the block whole: a stop signal that comes meanwhile reaches its handler after it.

    For a child's start and its pid file: an exception between the two (a
    Ctrl-C in ``up``) left the child running with nothing to find and stop it.
    Not pthread_sigmask: a child inherits the blocked set through exec, and
    would never hear the SIGTERM or SIGINT that ``stop`` sends it. Handlers
    run in the main thread alone, so only there is there anything to hold back.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    # Read before any is replaced: a signal now finds every handler as it was.
    saved = {sig: handler for sig in STOP_SIGNALS if (handler := signal.getsignal(sig)) is not None}
    try:
        for sig in saved:
            signal.signal(sig, lambda signum, _: came.append(signum))
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(came):
            if saved[signal.Signals(signum)] is not signal.SIG_IGN:
                signal.raise_signal(signum)  # to the handler put back: it may raise, as Ctrl-C does
