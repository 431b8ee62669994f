"""Explicit transactions on aiopg, which only runs in autocommit mode."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiopg


@asynccontextmanager
async def transaction(pool: aiopg.Pool) -> AsyncIterator[Any]:
    """A cursor inside BEGIN ... COMMIT, rolled back on any exception."""
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("BEGIN")
        try:
            yield cur
        except BaseException:
            await cur.execute("ROLLBACK")
            raise
        await cur.execute("COMMIT")
