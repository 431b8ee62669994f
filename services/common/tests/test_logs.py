"""configure_logging: the libraries' records come out as ours do, one object a line in JSON.

Each case runs in a child process: logging's configuration is global, and
would otherwise reach every test that runs after it.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from mesh_common.testing import communicate_within

# What a service's process logs: a library's warning, asyncio's report of a
# crashed task (a message over two lines, and a traceback), a library's INFO
# record (below the standard library's WARNING: dropped, as before), a Python
# warning, and one of our own events, all while a request_id is bound.
CHILD = """
import logging
import sys
import warnings

import structlog

from mesh_common.logs import configure_logging

configure_logging(sys.argv[1])
structlog.contextvars.bind_contextvars(request_id="req-1")
logging.getLogger("aio_pika").warning("Connection attempt to %s failed, reconnecting", "amqp://broker")
try:
    raise ValueError("boom")
except ValueError as exc:
    logging.getLogger("asyncio").error("Task exception was never retrieved\\nfuture: <Task finished>", exc_info=exc)
logging.getLogger("aiohttp.access").info("GET / 200")
warnings.warn("going away", DeprecationWarning, stacklevel=1)
structlog.get_logger().info("started", port=8080)
"""


# A process that dies of an exception nothing caught: a port already taken
# at start-up, say.
CRASHING = """
import sys

from mesh_common.logs import configure_logging

configure_logging(sys.argv[1])
raise OSError(98, "address already in use")
"""


async def run_child(fmt: str, code: str = CHILD, *, exit_status: int = 0) -> tuple[str, str]:
    """Stdout and stderr of ``code``, which configures logging as ``fmt``."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-W", "always::DeprecationWarning", "-c", code, fmt,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await communicate_within(process, 30)
    assert process.returncode == exit_status, err.decode()
    return out.decode(), err.decode()


async def test_json_makes_every_line_one_object_library_records_and_tracebacks_included() -> None:
    out, err = await run_child("json")
    assert out == ""
    lines = [line for line in err.splitlines() if line.strip()]
    entries: list[dict[str, Any]] = []
    for line in lines:
        entry = json.loads(line)  # a raw line (a traceback's, say) fails here
        assert isinstance(entry, dict), line
        assert {"event", "level", "timestamp"} <= entry.keys(), line
        entries.append(entry)
    # A multi-line message stays one string: it is keyed here by its first line.
    by_event = {entry["event"].split("\n")[0]: entry for entry in entries}
    assert len(by_event) == len(entries) == 4, by_event.keys()  # aiohttp.access's INFO is not among them

    reconnect = by_event["Connection attempt to amqp://broker failed, reconnecting"]
    assert reconnect["level"] == "warning" and reconnect["logger"] == "aio_pika"
    assert reconnect["request_id"] == "req-1"

    crashed = by_event["Task exception was never retrieved"]
    assert crashed["level"] == "error" and crashed["logger"] == "asyncio"
    assert crashed["event"] == "Task exception was never retrieved\nfuture: <Task finished>"
    assert crashed["request_id"] == "req-1"
    assert crashed["exception"].startswith("Traceback (most recent call last):")
    assert crashed["exception"].endswith("ValueError: boom")

    (warned,) = [entry for event, entry in by_event.items() if event.endswith("DeprecationWarning: going away")]
    assert warned["level"] == "warning" and warned["logger"] == "py.warnings"

    assert by_event["started"] == {**by_event["started"], "level": "info", "port": 8080, "request_id": "req-1"}


async def test_console_renders_library_records_as_ours() -> None:
    out, err = await run_child("console")
    assert out == ""
    assert "GET / 200" not in err
    (reconnect,) = [line for line in err.splitlines() if "reconnecting" in line]
    assert "[warning" in reconnect and "aio_pika" in reconnect and "request_id=req-1" in reconnect
    (started,) = [line for line in err.splitlines() if "started" in line]
    assert "[info" in started and "request_id=req-1" in started
    # The traceback is still printed in full, for a reader, under its record.
    assert "Traceback (most recent call last):" in err and "ValueError: boom" in err


async def test_json_reports_an_uncaught_exception_as_one_object_and_the_process_still_fails() -> None:
    out, err = await run_child("json", CRASHING, exit_status=1)
    assert out == ""
    (line,) = err.splitlines()  # not a traceback over several lines
    crash = json.loads(line)
    assert crash["event"] == "uncaught_exception" and crash["level"] == "critical"
    assert crash["exception"].startswith("Traceback (most recent call last):")
    assert crash["exception"].endswith("OSError: [Errno 98] address already in use")


async def test_console_leaves_an_uncaught_exception_to_python() -> None:
    out, err = await run_child("console", CRASHING, exit_status=1)
    assert out == ""
    assert err.startswith("Traceback (most recent call last):")
    assert err.rstrip().endswith("OSError: [Errno 98] address already in use")
