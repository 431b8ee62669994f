"""Explicit transactions on aiopg, which only runs in autocommit mode."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import aiopg
import psycopg2


@asynccontextmanager
async def transaction(pool: aiopg.Pool) -> AsyncIterator[Any]:
    """A cursor inside BEGIN ... COMMIT, rolled back on any exception."""
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("BEGIN")
        try:
            yield cur
        except BaseException:
            # aiopg closes a connection whose query was cancelled; the server
            # then rolls back by itself, and a failed ROLLBACK must not hide
            # what happened (a CancelledError turned InterfaceError would be
            # swallowed by callers that handle errors and go on).
            with suppress(psycopg2.Error):
                await cur.execute("ROLLBACK")
            raise
        await cur.execute("COMMIT")
