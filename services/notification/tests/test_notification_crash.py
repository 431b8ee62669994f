"""A process killed after sending and before acking: on restart, no email goes out twice.

The service runs as a real subprocess, ``python -m notification_service``,
with the stack's environment, our private queues and the stack's SMTP sink.
``NOTIFICATION_CRASH_AFTER_SEND=1`` makes it ``os._exit`` right after its
first email was accepted by the SMTP server and recorded as sent, before the
event is acknowledged; the broker then redelivers that event to the next run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import aiopg
from notification_support import SECRET, Broker, FakeUserService, eventually, new_user, registered

from devstack.config import StackConfig
from notification_service.consumer import CRASH_EXIT_CODE
from notification_service.topology import Topology


class ServiceProcess:
    def __init__(self, env: dict[str, str]) -> None:
        self._env = env
        self.logs: list[dict[str, Any]] = []
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "notification_service", env=self._env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        async for line in self.process.stderr:
            with contextlib.suppress(ValueError):
                self.logs.append(json.loads(line))

    def logged(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [e for e in self.logs if e.get("event") == event and fields.items() <= e.items()]

    async def wait(self, within: float) -> int:
        assert self.process is not None and self._reader is not None
        async with asyncio.timeout(within):
            code = await self.process.wait()
            await self._reader
        return code

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await self.wait(within=20)
            except TimeoutError:
                # Never left consuming from the suite's queues, stealing later tests' messages.
                self.process.kill()
                await self.wait(within=10)
                raise


@contextlib.asynccontextmanager
async def running(env: dict[str, str]) -> AsyncIterator[ServiceProcess]:
    service = ServiceProcess(env)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


async def test_killed_after_sending_and_before_acking_sends_no_duplicate_on_restart(
    infra: StackConfig, topology: Topology, broker: Broker, pool: aiopg.Pool, users: FakeUserService
) -> None:
    env = {
        **infra.service_env("notification"),
        "PATH": "/usr/bin:/bin",
        "SERVICE_CLIENT_SECRET": SECRET,
        "USER_SERVICE_NAME": users.name,
        "EVENTS_EXCHANGE": topology.exchange,
        "NOTIFICATION_QUEUES": topology.namespace,
        "LOG_FORMAT": "json",
    }
    newcomers = [new_user() for _ in range(5)]
    events = [registered(u) for u in newcomers]
    for event in events:
        await broker.publish(event)

    async with running({**env, "NOTIFICATION_CRASH_AFTER_SEND": "1", "AMQP_PREFETCH": "1"}) as first:
        assert await first.wait(within=30) == CRASH_EXIT_CODE
    [crash] = first.logged("crash_hook_exit")
    crashed_on = crash["event_id"]
    # A crashed instance cannot leave Consul; do it for it (Consul's reaper would, a minute later).
    [registered_as] = first.logged("consul_registered")
    await _deregister(infra.consul_url, registered_as["service_id"])
    assert await _sent_counts(infra, newcomers) == {crashed_on: 1}  # the email went out; its ack did not

    async with running(env) as second:
        await eventually(
            lambda: second.logged("notification_duplicate", event_id=crashed_on), within=30, what="the redelivery"
        )
        await eventually(
            lambda: _all_sent(infra, newcomers), within=30, what="the other events' emails after the restart"
        )

    counts = await _sent_counts(infra, newcomers)
    assert counts == {e.id: 1 for e in events}  # duplicates 0, lost 0


async def _deregister(consul_url: str, service_id: str) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.put(f"{consul_url}/v1/agent/service/deregister/{service_id}") as resp,
    ):
        assert resp.status == 200


async def _sent_counts(infra: StackConfig, newcomers: list[dict[str, str]]) -> dict[str, int]:
    """Emails per event id in the stack's SMTP sink, among those sent to ``newcomers``."""
    addresses = {u["email"] for u in newcomers}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{infra.mail_api_url}/api/v1/messages", params={"limit": "5000"}) as resp,
    ):
        messages = (await resp.json())["messages"]
    counts: Counter[str] = Counter()
    for m in messages:
        if {to["Address"] for to in m["To"]} & addresses:
            counts[_event_id(m["MessageID"])] += 1
    return dict(counts)


async def _all_sent(infra: StackConfig, newcomers: list[dict[str, str]]) -> bool:
    return len(await _sent_counts(infra, newcomers)) == len(newcomers)


def _event_id(message_id: str) -> str:
    # <hex.kind@domain>, see notification_service.messages.message_id
    return str(uuid.UUID(message_id.strip("<>").split(".", 1)[0]))
