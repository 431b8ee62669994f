"""The requests' pool hands its connections out first come, first served (mesh_common.fair_pool).

Against the real PostgreSQL. The order is the loop's, not a clock's: a task
made before a turn of the loop has run its first step by the end of it.
"""

from __future__ import annotations

import asyncio
import socket

import aiopg
import psycopg2
import pytest

from devstack.config import StackConfig
from mesh_common.fair_pool import FairPool, fair_pool

# Bounds each wait of the tests': a pool's timeout is theirs, and shorter.
BOUND = 10.0


async def one_turn() -> None:
    """Let every task already scheduled run its next step (until it waits)."""
    await asyncio.sleep(0)


async def acquire(pool: aiopg.Pool) -> aiopg.Connection:
    return await pool.acquire()


async def test_a_freed_connection_goes_to_the_longest_waiter_not_to_a_newcomer(infra: StackConfig) -> None:
    # aiopg's own pool gave it to the newcomer: its release hands the
    # connection on from a task of its own, a turn later, and the waiter
    # passed over queued again at the back. Under load a few requests
    # waited for seconds so.
    async with fair_pool(infra.database_url("todo"), minsize=1, maxsize=1, timeout=BOUND / 2) as pool:
        held = await pool.acquire()
        waiter = asyncio.create_task(acquire(pool))
        await one_turn()
        assert not waiter.done()
        # As a request's release goes: the next request asks in the same turn.
        handed_on = pool.release(held)
        newcomer = asyncio.create_task(acquire(pool))
        try:
            done, _ = await asyncio.wait({waiter, newcomer}, timeout=BOUND, return_when=asyncio.FIRST_COMPLETED)
            assert done == {waiter}
        finally:  # each released as it gets one, so the other gets it too, and the pool can close
            await handed_on
            for got in asyncio.as_completed((waiter, newcomer), timeout=BOUND):
                await pool.release(await got)


async def test_a_wait_is_bounded_by_the_pools_timeout_and_gives_its_turn_back(infra: StackConfig) -> None:
    async with fair_pool(infra.database_url("todo"), minsize=1, maxsize=1, timeout=0.2) as pool:
        held = await pool.acquire()
        # Not cut by the test's bound, which raises the same error: ended by the pool's timeout.
        waiter = asyncio.create_task(acquire(pool))
        try:
            await asyncio.wait({waiter}, timeout=BOUND)
            assert waiter.done()
            assert isinstance(waiter.exception(), TimeoutError)
        finally:  # else the pool could not close
            waiter.cancel()
            await pool.release(held)
        # The one turn is free again: had the waiter kept it, this would time out too.
        await pool.release(await asyncio.wait_for(acquire(pool), BOUND))


def refused_dsn() -> str:
    """A DSN on a loopback port with nobody listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"postgresql://nobody:nothing@127.0.0.1:{port}/nothing"


async def test_a_connect_that_fails_gives_its_turn_back() -> None:
    async with fair_pool(refused_dsn(), minsize=0, maxsize=1, timeout=BOUND / 2) as pool:
        for _ in range(3):  # the second would wait for the first's turn, and time out
            with pytest.raises(psycopg2.OperationalError):
                await asyncio.wait_for(acquire(pool), BOUND)


async def test_a_pool_without_a_size_is_refused() -> None:
    # aiopg's maxsize=0 is a pool without bound: there would be no turns to hand out.
    with pytest.raises(ValueError, match="maxsize"):
        FairPool("postgresql://", 0, 0, 1.0)  # refused before aiopg is asked for anything


async def test_a_connection_out_of_turn_goes_before_the_queue_and_gives_no_turn_back(infra: StackConfig) -> None:
    # For the check of a lost COMMIT (mesh_common.transactions): its request has had its turn.
    async with fair_pool(infra.database_url("todo"), minsize=1, maxsize=1, timeout=BOUND / 2) as pool:
        held = await pool.acquire()
        queued = asyncio.create_task(acquire(pool))
        try:
            await one_turn()
            checking = await asyncio.wait_for(pool.acquire_out_of_turn(), BOUND)
            assert not queued.done()
            await pool.release(checking)
            await one_turn()
            assert not queued.done()  # no turn came back with it: the one is held
        finally:
            await pool.release(held)
            await pool.release(await asyncio.wait_for(queued, BOUND))


class Silent:
    """A loopback listener that accepts connections and never says a word: a connect to it hangs."""

    def __init__(self) -> None:
        self.accepted: list[asyncio.StreamWriter] = []
        self.dsn = ""

    async def __aenter__(self) -> Silent:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.accepted.append(writer)

        self._server = await asyncio.start_server(accept, "127.0.0.1", 0)
        self.dsn = f"postgresql://nobody:nothing@127.0.0.1:{self._server.sockets[0].getsockname()[1]}/nothing"
        return self

    async def __aexit__(self, *exc: object) -> None:
        for writer in self.accepted:
            writer.close()
        self._server.close()
        await self._server.wait_closed()

    async def connected(self, count: int) -> None:
        """Return once ``count`` connections were made, failing after the tests' bound."""
        async with asyncio.timeout(BOUND):
            while len(self.accepted) < count:  # every 10 ms
                await asyncio.sleep(0.01)


async def test_a_connect_cut_by_the_deadline_gives_its_turn_back() -> None:
    async with Silent() as silent, fair_pool(silent.dsn, minsize=0, maxsize=1, timeout=0.2) as pool:
        for _ in range(2):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(acquire(pool), BOUND)
        # The second connected too, so it had the turn: not cut in the queue.
        assert len(silent.accepted) == 2


async def test_a_request_cancelled_while_it_connects_gives_its_turn_back() -> None:
    # As aiohttp cancels a handler whose client hung up: a CancelledError, no Exception.
    async with Silent() as silent, fair_pool(silent.dsn, minsize=0, maxsize=1, timeout=BOUND) as pool:
        for count in (1, 2):  # the second connects only if the first gave its turn back
            connecting = asyncio.create_task(acquire(pool))
            await silent.connected(count)
            connecting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await connecting
