"""Events across the whole system, with the real broker stopped and started.

The todo-service writes each event to its outbox in the same transaction as
the change; the relay publishes it once RabbitMQ is back. The
notification-service turns events into email in the SMTP sink.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter

import aio_pika
import aiohttp
import pytest

from devstack import rabbitmq, stack
from devstack.config import StackConfig
from devstack.procs import start, stop, wait_until

from .conftest import register_and_login

pytestmark = pytest.mark.e2e
TODOS_DURING_OUTAGE = 200
AUDIT_QUEUE = "e2e.audit.todo-created"
PASSWORD_NOTICE = "Your todo-mesh password was changed"
EMAIL_NOTICE = "Your todo-mesh email address was changed"


async def declare_audit_queue(cfg: StackConfig) -> None:
    """A durable queue that survives the broker restart and counts todo.created."""
    connection = await aio_pika.connect(cfg.amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange("todo-mesh.events", aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(AUDIT_QUEUE, durable=True)
        await queue.bind(exchange, "todo.created")
        await queue.purge()


async def drain_audit_queue(cfg: StackConfig, expected: int, *, within: float) -> list[str]:
    """Event ids consumed from the audit queue, until ``expected`` or ``within`` seconds."""
    ids: list[str] = []
    connection = await aio_pika.connect(cfg.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(AUDIT_QUEUE)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while loop.time() < deadline:
            message = await queue.get(fail=False)
            if message is None:
                if len(ids) >= expected:
                    break
                await asyncio.sleep(0.1)
                continue
            ids.append(json.loads(message.body)["id"])
            await message.ack()
        await queue.delete(if_unused=False, if_empty=False)
    return ids


def notification_checks(cfg: StackConfig) -> list[dict[str, str]]:
    """Each notification-service instance's checks: {"live" | "ready": status}."""
    entries = stack.service_health(cfg, "notification-service")
    return [{c["Name"].split(":")[0]: c["Status"] for c in entry["Checks"] if c["ServiceID"]} for entry in entries]


async def test_no_event_is_lost_while_rabbitmq_is_down(mesh: StackConfig, api: aiohttp.ClientSession) -> None:
    headers = await register_and_login(api)
    await declare_audit_queue(mesh)

    stop(mesh.run_dir, "rabbitmq", grace=30)
    try:
        created = 0
        for n in range(TODOS_DURING_OUTAGE):
            async with api.post("/api/v1/todos", json={"title": f"during the outage {n}"}, headers=headers) as r:
                assert r.status == 201, await r.text()
                created += 1
        # The user-service, too, only publishes through its outbox: sign-ups go on.
        await register_and_login(api)
        # The notification-service consumes, and cannot: it leaves the healthy
        # set by its readiness check, while its liveness check, the one that
        # can get it reaped, stays passing.
        wait_until(
            lambda: notification_checks(mesh) == [{"live": "passing", "ready": "critical"}],
            timeout=15,
            what="the notification-service to report itself not ready",
        )
    finally:
        start(mesh.run_dir, rabbitmq.server(mesh))
        wait_until(lambda: rabbitmq.ready(mesh), timeout=120, what="RabbitMQ to come back", interval=1.0)

    ids = await drain_audit_queue(mesh, created, within=90)
    distinct = set(ids)
    lost, duplicates = created - len(distinct), len(ids) - len(distinct)
    print(f"\ncommitted {created}, consumed {len(ids)}: lost {lost}, duplicates {duplicates}")
    assert len(distinct) == created


async def emailed_code(mail: aiohttp.ClientSession, address: str) -> str:
    """The code in the confirmation email to ``address``, once the sink has it."""
    async with asyncio.timeout(30):
        while True:
            async with mail.get("/api/v1/messages") as r:
                messages = (await r.json())["messages"]
            ids = [m["ID"] for m in messages if any(t["Address"] == address for t in m["To"])]
            if ids:
                async with mail.get(f"/api/v1/message/{ids[0]}") as r:
                    text = (await r.json())["Text"]
                codes = [line.removeprefix("Code: ").strip() for line in text.splitlines() if line.startswith("Code: ")]
                assert len(codes) == 1, text
                return codes[0]
            await asyncio.sleep(0.2)


def in_queue(cfg: StackConfig, queue: str) -> int:
    """Messages in ``queue`` ready or taken and not yet settled, as the broker counts them now.

    rabbitmqctl asks the queue itself; the management API's figures are
    sampled, seconds old.
    """
    listed = rabbitmq.rabbitmqctl(cfg, "list_queues", "name", "messages_ready", "messages_unacknowledged",
                                  "--formatter", "json")  # fmt: skip
    counts = {q["name"]: q["messages_ready"] + q["messages_unacknowledged"] for q in json.loads(listed)}
    return counts[queue]


async def test_a_confirmed_owner_is_emailed_on_a_completed_todo_a_new_password_and_a_new_address(
    mesh: StackConfig, api: aiohttp.ClientSession
) -> None:
    name = f"e2e_{uuid.uuid4().hex[:12]}"
    email = f"{name}@example.test"
    password = f"pw-{uuid.uuid4().hex}"
    async with api.post("/api/v1/users", json={"username": name, "email": email, "password": password}) as r:
        assert r.status == 201, await r.text()
        assert (await r.json())["email_verified"] is False
    async with aiohttp.ClientSession(base_url=mesh.mail_api_url) as mail:
        # From the user-service's outbox, through RabbitMQ, to the sink; the
        # code is what proves the address is the user's.
        code = await emailed_code(mail, email)
        async with api.post("/api/v1/auth/verify-email", json={"token": code}) as r:
            assert r.status == 204, await r.text()
        async with api.post("/api/v1/auth/verify-email", json={"token": code}) as r:
            assert r.status == 400, await r.text()  # once only
            assert (await r.json())["code"] == "INVALID_VERIFICATION_TOKEN"

        async with api.post("/api/v1/auth/login", json={"username": name, "password": password}) as r:
            headers = {"Authorization": f"Bearer {(await r.json())['access_token']}"}
        async with api.get("/api/v1/users/me", headers=headers) as r:
            assert (await r.json())["email_verified"] is True
        async with api.post("/api/v1/todos", json={"title": "water the plants"}, headers=headers) as r:
            assert r.status == 201, await r.text()
            todo = await r.json()
        async with api.post(f"/api/v1/todos/{todo['id']}/complete", headers=headers) as r:
            assert r.status == 200, await r.text()
        # From the user-service's outbox this time: its owner must hear of it.
        change = {"current_password": password, "new_password": f"new-{password}"}
        async with api.post("/api/v1/users/me/password", json=change, headers=headers) as r:
            assert r.status == 200, await r.text()
            headers = {"Authorization": f"Bearer {(await r.json())['access_token']}"}
        # And the account moved to another address: told at the old one.
        async with api.patch("/api/v1/users/me", json={"email": f"moved-{email}"}, headers=headers) as r:
            assert r.status == 200, await r.text()
        # The new address unconfirmed, a second new password is told at the
        # old one, the last the account confirmed.
        change = {"current_password": f"new-{password}", "new_password": f"newer-{password}"}
        async with api.post("/api/v1/users/me/password", json=change, headers=headers) as r:
            assert r.status == 200, await r.text()

        async def subjects() -> list[str]:
            async with mail.get("/api/v1/messages") as r:
                messages = (await r.json())["messages"]
            return [m["Subject"] for m in messages if any(t["Address"] == email for t in m["To"])]

        # Seconds, when an earlier test has just restarted the broker and
        # the todo-service's relay is still reconnecting.
        async with asyncio.timeout(30):
            expected = Counter({"Done: water the plants": 1, PASSWORD_NOTICE: 2, EMAIL_NOTICE: 1})
            while not expected <= Counter(await subjects()):
                await asyncio.sleep(0.2)
            # A second copy, redelivered or published again, would come
            # through the queue: read the mailbox once it is empty and
            # nothing taken from it is still being handled.
            while await asyncio.to_thread(in_queue, mesh, "notifications.events"):
                await asyncio.sleep(0.2)
        received = await subjects()
    print(f"\nmail for {email}: {received}")
    assert received.count("Done: water the plants") == received.count(EMAIL_NOTICE) == 1  # one of each
    assert received.count(PASSWORD_NOTICE) == 2
    assert len(received) == 5  # and the confirmation: registering sends no welcome of its own
