"""Two things aiopg leaves to us: explicit transactions (it only runs in
autocommit mode), and statements the server cancelled (it reports them as
``asyncio.CancelledError``). A transaction made for a request commits only
with time left before the request's deadline, and is then not cut
(``deadlines.before_commit``); a COMMIT that fails on its way is asked
after, so that a change that was made is not reported as failed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Any

import aiopg
import psycopg2
import structlog
from psycopg2.extensions import QueryCanceledError

from .deadlines import before_commit
from .fair_pool import FairPool

log = structlog.get_logger()

# How long the outcome of a COMMIT whose answer was lost is asked after:
# seconds, on another connection. Past it, the outcome is unknown.
COMMIT_CHECK_TIMEOUT = 2.0
COMMIT_CHECK_INTERVAL = 0.05


class CommitOutcomeUnknown(Exception):
    """A COMMIT's answer was lost, and asking after it failed too: the change may have been made."""


@asynccontextmanager
async def transaction(pool: aiopg.Pool) -> AsyncIterator[Any]:
    """A cursor inside BEGIN ... COMMIT, rolled back on any exception.

    A COMMIT that fails without an answer (aiopg's timeout, a dropped
    connection) may have been made all the same: the server finishes a
    COMMIT it has received. Told "failed, try again", a client would make a
    second todo. So the transaction's id is asked after on another
    connection: committed, the block has succeeded; rolled back, the error
    stands; neither within ``COMMIT_CHECK_TIMEOUT``, ``CommitOutcomeUnknown``.
    """
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("BEGIN")
        try:
            yield cur
            # One round trip more, to know what to ask after if the COMMIT's
            # answer is lost; none is assigned to a transaction that wrote
            # nothing. Before before_commit, under the request's deadline.
            await cur.execute("SELECT txid_current_if_assigned()")
            (xid,) = await cur.fetchone()
            before_commit()
        except BaseException:
            # aiopg closes a connection whose query was cancelled; the server
            # then rolls back by itself, and a failed ROLLBACK must not hide
            # what happened (a CancelledError turned InterfaceError would be
            # swallowed by callers that handle errors and go on).
            with suppress(psycopg2.Error):
                await cur.execute("ROLLBACK")
            raise
        try:
            await cur.execute("COMMIT")
            return
        except (TimeoutError, psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
            # Not an error the server answered with (a deferred constraint):
            # that COMMIT rolled back, and says so.
            if xid is None:
                raise
            lost = exc
    # Out of the block: the failed connection is back in the pool, and closed.
    await _settled(pool, xid, lost)


async def _settled(pool: aiopg.Pool, xid: int, lost: BaseException) -> None:
    """Return if transaction ``xid`` committed; raise ``lost`` if it rolled back, else CommitOutcomeUnknown."""
    # "in progress": the server is still at the COMMIT (waiting for its disk),
    # or could not be asked (restarting, a check timed out): asked again until
    # the time is up, on one connection kept for it, so that requests queued
    # for the pool do not take it between two checks. The loop reads the
    # clock as well as being cut: on Python 3.11 aiopg (its wait_for) can
    # swallow the cut, turned into the error a connect failed with at the
    # same moment, and the checks went on for ever.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + COMMIT_CHECK_TIMEOUT
    status: str | None = "in progress"
    conn: Any = None
    try:
        with suppress(TimeoutError):  # the overall bound's; one check's own is suppressed below
            async with asyncio.timeout_at(deadline):
                while loop.time() < deadline:
                    try:
                        if conn is None:
                            # Not behind the requests queued for the pool: this one has had its turn.
                            conn = await (pool.acquire_out_of_turn() if isinstance(pool, FairPool) else pool.acquire())
                        async with conn.cursor() as cur:
                            await cur.execute("SELECT txid_status(%s)", (xid,))
                            (status,) = await cur.fetchone()
                    except (psycopg2.Error, TimeoutError) as exc:
                        log.info("commit_check_failed", error=type(exc).__name__)
                        if conn is not None:
                            await pool.release(conn)  # closed by aiopg: dropped from the pool
                            conn = None
                    if status != "in progress":  # None: too old to know, never the case this soon
                        break
                    await asyncio.sleep(COMMIT_CHECK_INTERVAL)
    finally:
        if conn is not None:
            await pool.release(conn)
    if status == "committed":
        log.warning("commit_answer_lost_but_committed", error=type(lost).__name__)
        return
    if status == "aborted":
        raise lost
    log.error("commit_outcome_unknown", error=type(lost).__name__, status=status)
    raise CommitOutcomeUnknown(
        f"the COMMIT's answer was lost ({type(lost).__name__}), and its outcome is unknown"
    ) from lost


@contextmanager
def server_cancels_as_errors() -> Iterator[None]:
    """A statement PostgreSQL cancelled is a database error, not a cancellation.

    aiopg raises ``asyncio.CancelledError`` when the server cancels a
    statement: a ``statement_timeout`` set on a role or a database, or
    ``pg_cancel_backend``. Taken for a cancellation, it ended worker loops
    (the outbox relay, pruners) in silence, and dropped a request's
    connection unanswered. aiopg raises it while handling the server's
    ``QueryCanceledError``, which it thereby carries as its context; a
    cancellation of ours (``Task.cancel``, aiohttp's shutdown) never does,
    and goes on as it is.
    """
    try:
        yield
    except asyncio.CancelledError as exc:
        if isinstance(server := exc.__context__, QueryCanceledError):
            raise server from None
        raise
