"""Two things aiopg leaves to us: explicit transactions (it only runs in
autocommit mode), and statements the server cancelled (it reports them as
``asyncio.CancelledError``). A transaction made for a request commits only
with time left before the request's deadline, and is then not cut
(``deadlines.before_commit``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Any

import aiopg
import psycopg2
from psycopg2.extensions import QueryCanceledError

from .deadlines import before_commit


@asynccontextmanager
async def transaction(pool: aiopg.Pool) -> AsyncIterator[Any]:
    """A cursor inside BEGIN ... COMMIT, rolled back on any exception."""
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("BEGIN")
        try:
            yield cur
            before_commit()
        except BaseException:
            # aiopg closes a connection whose query was cancelled; the server
            # then rolls back by itself, and a failed ROLLBACK must not hide
            # what happened (a CancelledError turned InterfaceError would be
            # swallowed by callers that handle errors and go on).
            with suppress(psycopg2.Error):
                await cur.execute("ROLLBACK")
            raise
        await cur.execute("COMMIT")


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
