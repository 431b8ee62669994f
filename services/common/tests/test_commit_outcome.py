"""A COMMIT whose answer is lost: asked after, so a change that was made is not reported as failed.

Against the real PostgreSQL. A deferred constraint trigger that sleeps holds
each test's COMMIT at the server while aiopg's own timeout (short here) gives
up on its answer: what a COMMIT waiting for a slow disk looks like.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiopg
import psycopg2
import pytest
from aiohttp import web
from structlog.testing import capture_logs
from yarl import URL

from devstack.config import StackConfig
from mesh_common import transactions
from mesh_common.deadlines import deadline_middleware
from mesh_common.fair_pool import fair_pool
from mesh_common.problems import problem_middleware
from mesh_common.testing.proxy import TcpProxy
from mesh_common.transactions import CommitOutcomeUnknown, _settled, transaction

# aiopg's, per statement (and connect): well under the COMMIT's sleep, so its
# answer is lost, and long enough for every other round trip on a busy machine.
ANSWER_TIMEOUT = 1.0
COMMIT_SLEEP = 2.5
# The checks' bound in the tests that wait for the COMMIT's end: its 2 s
# default left a busy machine a second of margin.
CHECK_TIMEOUT = 5.0


@pytest.fixture
async def table(infra: StackConfig) -> AsyncIterator[str]:
    """A table whose rows' COMMIT sleeps as long as the row says, then fails if it says so."""
    name = f"commit_probe_{uuid.uuid4().hex[:8]}"
    async with aiopg.connect(infra.database_url("todo")) as conn, conn.cursor() as cur:
        await cur.execute(
            f"CREATE TABLE {name} (id text PRIMARY KEY, sleep float NOT NULL, fail boolean NOT NULL);"
            f" CREATE FUNCTION {name}_slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            "  PERFORM pg_sleep(NEW.sleep);"
            "  IF NEW.fail THEN RAISE EXCEPTION 'refused at commit'; END IF;"
            "  RETURN NULL; END $$;"
            f" CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON {name} DEFERRABLE INITIALLY DEFERRED"
            f"  FOR EACH ROW EXECUTE FUNCTION {name}_slow()"
        )
        try:
            yield name
        finally:
            await cur.execute(f"DROP TABLE {name}; DROP FUNCTION {name}_slow()")


async def rows(infra: StackConfig, table: str) -> list[str]:
    async with aiopg.connect(infra.database_url("todo")) as conn, conn.cursor() as cur:
        await cur.execute(f"SELECT id FROM {table}")
        return [row[0] for row in await cur.fetchall()]


async def insert(pool: aiopg.Pool, table: str, *, sleep: float = COMMIT_SLEEP, fail: bool = False) -> None:
    async with transaction(pool) as cur:
        await cur.execute(f"INSERT INTO {table} (id, sleep, fail) VALUES ('x', %s, %s)", (sleep, fail))


async def test_a_commit_made_though_its_answer_was_lost_is_a_success(
    infra: StackConfig, table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transactions, "COMMIT_CHECK_TIMEOUT", CHECK_TIMEOUT)
    async with aiopg.create_pool(infra.database_url("todo"), maxsize=2, timeout=ANSWER_TIMEOUT) as pool:
        with capture_logs() as logs:
            await insert(pool, table)  # used to raise TimeoutError: a 503, "try again"
    assert await rows(infra, table) == ["x"]
    # A check that timed out on a busy machine is logged too (info), and asked again.
    warnings = [entry["event"] for entry in logs if entry["log_level"] != "info"]
    assert warnings == ["commit_answer_lost_but_committed"]


async def test_a_commit_that_rolled_back_after_its_answer_was_lost_keeps_its_error(
    infra: StackConfig, table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transactions, "COMMIT_CHECK_TIMEOUT", CHECK_TIMEOUT)
    async with aiopg.create_pool(infra.database_url("todo"), maxsize=2, timeout=ANSWER_TIMEOUT) as pool:
        with pytest.raises(TimeoutError):
            await insert(pool, table, fail=True)
    assert await rows(infra, table) == []


async def test_a_lost_commits_check_does_not_wait_behind_the_requests_queued_for_the_pool(
    infra: StackConfig, table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its request's turn goes to the next in the queue, which holds it: in
    # the queue, the check would wait past its time and say "unknown".
    monkeypatch.setattr(transactions, "COMMIT_CHECK_TIMEOUT", CHECK_TIMEOUT)
    done = asyncio.Event()

    async def next_request(pool: aiopg.Pool) -> None:
        async with asyncio.timeout(3 * CHECK_TIMEOUT):  # asks again each time the pool's timeout cuts it
            while True:
                with contextlib.suppress(TimeoutError):
                    conn = await pool.acquire()
                    break
            try:
                await done.wait()
            finally:
                await pool.release(conn)

    async with fair_pool(infra.database_url("todo"), minsize=1, maxsize=1, timeout=ANSWER_TIMEOUT) as pool:
        inserting = asyncio.create_task(insert(pool, table))
        await asyncio.sleep(0)  # one turn of the loop: the insert has its turn
        queued = asyncio.create_task(next_request(pool))
        try:
            await inserting
        finally:
            done.set()
            await queued
    assert await rows(infra, table) == ["x"]


async def test_a_commit_whose_outcome_cannot_be_asked_is_unknown_not_failed(infra: StackConfig, table: str) -> None:
    proxy = TcpProxy(infra.ports.postgres)
    try:
        await proxy.start()
        dsn = str(URL(infra.database_url("todo")).with_port(proxy.port))
        # The answer is lost to the cut alone, made while the COMMIT sleeps
        # (long here: the cut must come first on a busy machine too).
        async with aiopg.create_pool(dsn, maxsize=2, timeout=30) as pool:
            inserting = asyncio.create_task(insert(pool, table, sleep=5))
            await committing(infra)
            await proxy.cut()  # and PostgreSQL cannot be reached to ask
            with pytest.raises(CommitOutcomeUnknown):
                async with asyncio.timeout(10):
                    await inserting
    finally:
        await proxy.close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    async with asyncio.timeout_at(deadline):  # it was made: a retry would have made it twice
        while await rows(infra, table) != ["x"]:
            if loop.time() >= deadline:  # the cut may be lost inside aiopg (see committing)
                pytest.fail("the row was not there within 10 s")
            await asyncio.sleep(0.05)


async def committing(infra: StackConfig) -> None:
    # Bounded by the clock as well as the cut: on Python 3.11 aiopg (its
    # wait_for) can swallow the cut, and the loop would run until pytest's
    # own timeout instead of failing at 5 s.
    loop = asyncio.get_running_loop()
    async with aiopg.connect(infra.database_url("todo")) as conn, conn.cursor() as cur:
        deadline = loop.time() + 5
        async with asyncio.timeout_at(deadline):
            while loop.time() < deadline:  # every 10 ms
                # In our trigger's sleep: other suites' COMMITs may be running too.
                await cur.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE query = 'COMMIT' AND state = 'active' AND wait_event = 'PgSleep'"
                )
                if (await cur.fetchone())[0] >= 1:
                    return
                await asyncio.sleep(0.01)
    pytest.fail("no COMMIT in the trigger's sleep within 5 s")


class AskedPool:
    """A pool whose connections answer txid_status with ``answers`` in turn; a TimeoutError answer is raised."""

    def __init__(self, *answers: str | type[TimeoutError]) -> None:
        self._answers = list(answers)
        self.acquired = self.released = 0

    async def acquire(self) -> AskedPool:
        self.acquired += 1
        return self

    async def release(self, conn: object) -> None:
        self.released += 1

    @contextlib.asynccontextmanager
    async def cursor(self) -> AsyncIterator[AskedPool]:
        yield self

    async def execute(self, statement: str, args: tuple[int]) -> None:
        assert statement == "SELECT txid_status(%s)" and args == (7,)
        if self._answers[0] is TimeoutError:
            self._answers.pop(0)
            raise TimeoutError

    async def fetchone(self) -> tuple[object]:
        return (self._answers.pop(0),)


async def test_the_outcome_is_asked_on_one_connection_until_it_is_known() -> None:
    # Given back between checks, a connection went to a request queued for
    # the pool, and the next check waited behind it past its time.
    pool = AskedPool("in progress", "in progress", "committed")
    await _settled(pool, 7, TimeoutError())  # type: ignore[arg-type]
    assert (pool.acquired, pool.released) == (1, 1)


async def test_a_check_that_times_out_is_asked_again() -> None:
    # aiopg's own timeout, on one check: it used to end the checking.
    pool = AskedPool(TimeoutError, "committed")
    await _settled(pool, 7, TimeoutError())  # type: ignore[arg-type]
    assert pool.acquired == 2


class SwallowingPool(AskedPool):
    """Always "in progress", slowly; the first cancellation comes out as the error a connect failed with.

    What aiopg does on Python 3.11 when a cancellation arrives as the
    connection's answer does (its ``asyncio.wait_for``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.swallowed = 0

    async def execute(self, statement: str, args: tuple[int]) -> None:
        try:
            # The first outlasts the bound, so that its cut lands here.
            await asyncio.sleep(0.02 if self.swallowed else 10)
        except asyncio.CancelledError:
            if self.swallowed:
                raise
            self.swallowed += 1
            raise psycopg2.OperationalError("connection refused") from None

    async def fetchone(self) -> tuple[object]:
        return ("in progress",)


async def test_a_swallowed_cancellation_does_not_keep_the_checks_going(monkeypatch: pytest.MonkeyPatch) -> None:
    # Seen in CI: the overall bound's cancellation, lost inside aiopg,
    # left the checks going past any caller's patience.
    monkeypatch.setattr(transactions, "COMMIT_CHECK_TIMEOUT", 0.3)
    pool = SwallowingPool()
    with pytest.raises(CommitOutcomeUnknown):
        async with asyncio.timeout(5):
            await _settled(pool, 7, TimeoutError())  # type: ignore[arg-type]
    assert pool.swallowed == 1


async def test_a_rolled_back_commit_raises_what_lost_its_answer() -> None:
    lost = TimeoutError("aiopg's")
    with pytest.raises(TimeoutError) as raised:
        await _settled(AskedPool("aborted"), 7, lost)  # type: ignore[arg-type]
    assert raised.value is lost


async def test_the_query_that_names_the_transaction_runs_under_the_requests_deadline(
    infra: StackConfig, table: str, aiohttp_client: Any
) -> None:
    # After before_commit the deadline cuts nothing: a slow statement there
    # went on to commit what the client had been told (504) had failed.
    async def handler(request: web.Request) -> web.Response:
        await insert(SlowToName(request.app[POOL]), table, sleep=0)  # type: ignore[arg-type]
        return web.Response(status=201)

    app = web.Application(middlewares=[problem_middleware, deadline_middleware(0.6)])
    app.router.add_post("/", handler)
    async with aiopg.create_pool(infra.database_url("todo"), maxsize=2) as pool:
        app[POOL] = pool
        client = await aiohttp_client(app)
        resp = await client.post("/")
        assert resp.status == 503
    assert await rows(infra, table) == []


POOL = web.AppKey("pool", aiopg.Pool)


class SlowToName:
    """A pool whose cursors take a second over ``SELECT txid_current_if_assigned()``."""

    def __init__(self, pool: aiopg.Pool) -> None:
        self._pool = pool

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[SlowToName]:
        async with self._pool.acquire() as conn:
            self._conn = conn
            yield self

    @contextlib.asynccontextmanager
    async def cursor(self) -> AsyncIterator[Any]:
        async with self._conn.cursor() as cur:
            execute = cur.execute

            async def slow(statement: str, *args: Any) -> None:
                if statement == "SELECT txid_current_if_assigned()":
                    await asyncio.sleep(1)
                await execute(statement, *args)

            cur.execute = slow  # type: ignore[method-assign,assignment]
            yield cur
