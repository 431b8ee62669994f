"""No lost events: a committed todo's event reaches the broker, whatever happens in between.

Two ways to lose an event without an outbox: commit while the broker is
unreachable, or crash between the commit and the publish. Both are staged
here against the real PostgreSQL and RabbitMQ (in this suite's own virtual
host; the shared broker itself is never stopped: the end-to-end suite does
that).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import sys
import uuid
from typing import Any

import aio_pika
import aiopg

from mesh_common.consul import consul_client
from mesh_common.relay import OutboxRelay
from todo_service.app import create_app
from todo_service.model import NewTodo
from todo_service.todos import Todos


def unused_port() -> int:
    """A port nothing listens on: the kernel's pick, released at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def outbox(db: aiopg.Pool) -> dict[str, bool]:
    """Event id -> published, for every event in the outbox."""
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT id, published_at IS NOT NULL FROM outbox")
        return {str(event_id): published for event_id, published in await cur.fetchall()}


async def test_todos_commit_while_the_broker_is_unreachable_and_no_event_is_lost(
    aiohttp_client, settings, tokens, alice, db, event_tap, amqp_url, poll
):
    no_broker = dataclasses.replace(settings, amqp_url=f"amqp://guest:guest@127.0.0.1:{unused_port()}/")
    client = await aiohttp_client(create_app(no_broker, verifier=tokens.verifier()))
    tap = await event_tap("todo.created")

    async def create(n: int) -> int:
        resp = await client.post("/todos", json={"title": f"todo {n}"}, headers=alice.headers)
        return resp.status

    statuses = []
    for batch in range(10):
        statuses += await asyncio.gather(*(create(batch * 20 + n) for n in range(20)))
    assert statuses == [201] * 200
    committed = await outbox(db)
    assert len(committed) == 200 and not any(committed.values())
    assert (await client.get("/health")).status == 200  # still in service without a broker

    # A relay that can reach the broker, as the instance's own would once it is back.
    connection = await aio_pika.connect_robust(amqp_url)
    relay = OutboxRelay(db, connection)
    running = asyncio.create_task(relay.run())
    try:
        await poll(lambda: _all_published(db), within=30)
    finally:
        relay.stop()
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await connection.close()

    received = [message.message_id for message in await tap.everything_confirmed("todo.created")]
    consumed = set(received)
    lost = set(committed) - consumed
    print(
        f"events: committed {len(committed)}, consumed {len(consumed)}, lost {len(lost)},"
        f" duplicates {len(received) - len(consumed)}"
    )
    assert lost == set()
    assert consumed == set(committed)


async def _all_published(db: aiopg.Pool) -> bool:
    return all((await outbox(db)).values())


class ServiceProcess:
    """``python -m todo_service`` as a real process, with its JSON log read as it comes."""

    def __init__(self, env: dict[str, str]) -> None:
        self._env = env
        self.log: list[dict[str, Any]] = []
        self._logged = asyncio.Condition()
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "todo_service",
            env=self._env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        async for line in self.process.stderr:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                async with self._logged:
                    self.log.append(entry)
                    self._logged.notify_all()

    async def logged(self, event: str, within: float = 30.0) -> dict[str, Any]:
        async with asyncio.timeout(within), self._logged:
            await self._logged.wait_for(lambda: any(e.get("event") == event for e in self.log))
        return next(e for e in self.log if e.get("event") == event)

    async def exit_code(self, within: float = 30.0) -> int:
        assert self.process is not None
        async with asyncio.timeout(within):
            code = await self.process.wait()
        await self._reader
        return code

    async def stop(self) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await self.exit_code()

    async def kill(self) -> None:
        # Also called from a finally: a process that never started is fine.
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


async def test_a_relay_that_dies_before_publishing_loses_no_event(infra, amqp_url, alice, db, event_tap, poll):
    tap = await event_tap("todo.created")
    env = {
        **infra.service_env("todo"),
        "PATH": os.environ.get("PATH", ""),
        "AMQP_URL": amqp_url,
        "SERVICE_PORT": "0",
        "LOG_FORMAT": "json",
    }
    crashing = ServiceProcess({**env, "OUTBOX_RELAY_CRASH_BEFORE_PUBLISH": "1"})
    restarted = ServiceProcess(env)
    consul = consul_client(infra.consul_url)
    try:
        await crashing.start()
        await crashing.logged("serving")

        # The change commits through the service's own code path, transaction and outbox included.
        created = await Todos(db).create(
            alice.id, NewTodo("Survive the crash"), correlation_id="crash-" + uuid.uuid4().hex
        )
        todo_id = created.snapshot["id"]

        assert await crashing.exit_code() == 70
        assert await crashing.logged("outbox_relay_crash_hook")
        pending = await outbox(db)
        assert list(pending.values()) == [False], "the event must still be waiting in the outbox"

        await restarted.start()
        message = await tap.next(within=30)
        event = json.loads(message.body)
        assert message.message_id == event["id"] == next(iter(pending))
        assert event["type"] == "todo.created" and event["data"]["id"] == todo_id
        await poll(lambda: _all_published(db))
        assert await restarted.stop() == 0
    finally:
        await crashing.kill()
        await restarted.kill()
        # The crashed instance could not leave Consul by itself.
        if crashing.log and (serving := [e for e in crashing.log if e.get("event") == "serving"]):
            host, port = serving[0]["address"]
            await consul.agent.service.deregister(f"todo-service-{host}-{port}")
        await consul.close()
