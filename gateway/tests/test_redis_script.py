"""The rate limiter's Redis connection: answers in order, and failures that heal."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from devstack.config import StackConfig
from mesh_gateway.redis_script import RedisScript, RedisScriptError, Reply

from .conftest import GATEWAY_REDIS_DB, SilentServer

ECHO_ARGS = "return {KEYS[1], ARGV[1]}"


@pytest.fixture
def url(infra: StackConfig) -> str:
    return f"redis://127.0.0.1:{infra.ports.redis}/{GATEWAY_REDIS_DB}"


@pytest.fixture
async def redis(url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(url)
    yield client
    await client.aclose()


async def call(script: RedisScript, keys: list[str], args: list[str | int]) -> Reply:
    answer: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
    script.call(keys, args, answer.set_result)
    async with asyncio.timeout(5):
        return await answer


async def connection_id(redis: aioredis.Redis, name: str) -> int | None:
    ids = [c["id"] for c in await redis.client_list() if c.get("name") == name]
    return int(ids[0]) if ids else None


async def test_pipelined_calls_get_their_own_answers(url):
    script = RedisScript(url, ECHO_ARGS)
    try:
        answers: list[asyncio.Future[Reply]] = []
        for n in range(50):  # written back to back, before any answer is read
            answers.append(asyncio.get_running_loop().create_future())
            script.call([f"k{n}"], [n], answers[-1].set_result)
        replies = await asyncio.gather(*answers)
        assert replies == [[f"k{n}".encode(), str(n).encode()] for n in range(50)]
    finally:
        script.close()


async def test_an_error_reply_goes_to_its_caller_only(url):
    script = RedisScript(url, "if ARGV[1] == 'bad' then return redis.error_reply('refused') end return {1}")
    try:
        bad, good = await asyncio.gather(call(script, [], ["bad"]), call(script, [], ["ok"]))
        assert isinstance(bad, RedisScriptError)
        assert "refused" in str(bad)
        assert good == [1]
    finally:
        script.close()


async def test_a_dropped_connection_fails_what_was_outstanding_and_the_next_call_reconnects(url, redis):
    name = f"test-{uuid.uuid4().hex[:8]}"
    script = RedisScript(url, ECHO_ARGS, name=name)
    loop = asyncio.get_running_loop()
    try:
        assert await call(script, ["a"], [1]) == [b"a", b"1"]
        first = await connection_id(redis, name)
        assert first is not None
        # Scripts wait out a write pause unanswered; CLIENT commands do not.
        await redis.execute_command("CLIENT", "PAUSE", "5000", "WRITE")
        try:
            outstanding: list[asyncio.Future[Reply]] = [loop.create_future() for _ in range(3)]
            for n, answer in enumerate(outstanding):
                script.call(["b"], [n], answer.set_result)
            deadline = loop.time() + 3
            while "b" not in next(c["flags"] for c in await redis.client_list() if c.get("name") == name):
                assert loop.time() < deadline, "the calls never reached Redis"
                await asyncio.sleep(0.01)
            await redis.client_kill_filter(_id=first)
            async with asyncio.timeout(2):  # well inside the pause: failed by the loss, not answered late
                replies = await asyncio.gather(*outstanding)
        finally:
            await redis.execute_command("CLIENT", "UNPAUSE")
        assert all(isinstance(r, RedisScriptError) for r in replies), replies
        # A later call connects again.
        assert await call(script, ["c"], [3]) == [b"c", b"3"]
        assert (await connection_id(redis, name)) not in (None, first)
    finally:
        script.close()


async def test_a_silent_server_fails_calls_at_the_deadline_and_is_dropped(silent_server: SilentServer) -> None:
    script = RedisScript(f"redis://127.0.0.1:{silent_server.port}/0", ECHO_ARGS, timeout=0.2)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        reply = await call(script, ["a"], [1])
        assert isinstance(reply, RedisScriptError)
        assert "timed out" in str(reply)
        assert 0.2 <= loop.time() - started < 2
        # The next call does not trust the old connection: it opens another.
        assert isinstance(await call(script, ["a"], [1]), RedisScriptError)
        assert silent_server.accepted == 2
    finally:
        script.close()


async def test_an_unreachable_redis_fails_the_call_at_once():
    script = RedisScript("redis://127.0.0.1:1/0", ECHO_ARGS)  # nothing listens there
    try:
        reply = await call(script, ["a"], [1])
        assert isinstance(reply, RedisScriptError)
        assert "cannot connect" in str(reply)
    finally:
        script.close()


async def test_a_call_made_from_a_failure_callback_tries_again_at_once():
    # The rate limiter sends its next batch from the callback of the last one.
    script = RedisScript("redis://127.0.0.1:1/0", ECHO_ARGS, timeout=5)
    second: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
    try:
        script.call(["a"], [1], lambda _: script.call(["b"], [2], second.set_result))
        async with asyncio.timeout(1):  # not the 5 s deadline
            reply = await second
        assert isinstance(reply, RedisScriptError)
        assert "cannot connect" in str(reply)
    finally:
        script.close()
