"""A delivery cut short (a shutdown's drain ran out) gets a moment to record what its send left behind."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

log = structlog.get_logger()

# How long a delivery cut short (a shutdown's drain that ran out) may still
# take to record what its send left behind: well within the time the
# consumer gives the deliveries it cancels (consumer.STUCK_CANCEL_TIMEOUT).
CUT_SHORT_GRACE = 3.0


async def given_a_moment(write: asyncio.Future[Any]) -> bool:
    """Wait for ``write``, of a delivery being cut short, ``CUT_SHORT_GRACE`` s at most: whether it was made.

    Cancelled once more meanwhile, or not done by then, it is cut short too.
    """
    write.add_done_callback(_retrieved)
    try:
        await asyncio.wait({write}, timeout=CUT_SHORT_GRACE)
    finally:
        write.cancel()  # nothing to cancel once it is done
    if write.cancelled() or not write.done():
        return False
    if (exc := write.exception()) is not None:
        log.warning("notification_record_failed", error=type(exc).__name__, detail=str(exc))
        return False
    return True


def _retrieved(write: asyncio.Future[Any]) -> None:
    """Its error read, so that asyncio does not log it as never retrieved: one cut short may end in one."""
    if not write.cancelled():
        write.exception()
