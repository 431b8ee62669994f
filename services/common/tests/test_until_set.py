"""``until_set``: a wait that a stop ends, with its own bound, and the waited-for error raised."""

from __future__ import annotations

import asyncio

import pytest

from mesh_common.app import until_set


async def test_what_ends_first_says_whether_the_wait_finished() -> None:
    stop = asyncio.Event()
    assert await until_set(stop, asyncio.sleep(0))
    # Its bound reached: not finished, and cancelled.
    never = asyncio.ensure_future(asyncio.Event().wait())
    assert not await until_set(stop, never, within=0.01)
    await asyncio.sleep(0)
    assert never.cancelled()
    # The event set: the same, at once, whatever the bound.
    stop.set()
    async with asyncio.timeout(5):
        assert not await until_set(stop, asyncio.Event().wait(), within=60)


async def test_the_error_of_what_was_waited_for_is_raised() -> None:
    async def fails() -> None:
        raise ConnectionError("the broker went away")

    with pytest.raises(ConnectionError, match="went away"):
        await until_set(asyncio.Event(), fails())
