"""How the outbox relay reports a failed round: an outage is a warning, anything else an error to look at."""

from __future__ import annotations

import asyncio

import psycopg2.errors
from structlog.testing import capture_logs

from mesh_common.relay import OutboxRelay


async def test_a_failure_that_is_no_outage_is_an_error_with_its_traceback_and_an_outage_a_warning() -> None:
    # A revoked grant looks like no outage: the relay would retry it for ever,
    # and only a log line with the database's own words says why.
    failures: list[Exception] = [
        psycopg2.errors.InsufficientPrivilege("permission denied for table outbox"),
        ConnectionError("the broker went away"),
    ]
    relay = OutboxRelay(None, None, poll_interval=0.05)  # type: ignore[arg-type]

    async def publish_batch() -> int:
        if failures:
            raise failures.pop(0)
        relay.stop()
        return 0

    relay.publish_batch = publish_batch  # type: ignore[method-assign]
    with capture_logs() as logs:
        async with asyncio.timeout(5):
            await relay.run()

    logged = [e for e in logs if e["event"] == "outbox_publish_failed"]
    assert [(e["log_level"], e["error"]) for e in logged] == [
        ("error", "InsufficientPrivilege"),
        ("warning", "ConnectionError"),
    ]
    assert isinstance(logged[0]["exc_info"], psycopg2.errors.InsufficientPrivilege)
    assert logged[1]["detail"] == "the broker went away"
