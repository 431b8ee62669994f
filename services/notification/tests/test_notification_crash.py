"""A process killed after sending and before acking: on restart, no email goes out twice.

The service runs as a real subprocess, ``python -m notification_service``,
with the stack's environment, our private queues and this test's SMTP
server. Its AMQP connection goes through a TCP proxy to the real broker.
The server holds its first email in DATA; the test freezes the proxy, lets
the server answer, waits until PostgreSQL has the email recorded as sent,
and kills the process with SIGKILL: its ack is held in the frozen proxy,
and goes nowhere. The broker then redelivers that event to the next run.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import Counter
from collections.abc import AsyncIterator

import aiopg
from notification_support import SECRET, Broker, FakeUserService, eventually, new_user, verification_requested
from smtp_sink import SmtpSink
from yarl import URL

from devstack.config import StackConfig
from mesh_common.consul import consul_client
from mesh_common.testing.process import ServiceProcess
from mesh_common.testing.proxy import TcpProxy
from notification_service.topology import Topology


@contextlib.asynccontextmanager
async def running(env: dict[str, str]) -> AsyncIterator[ServiceProcess]:
    service = ServiceProcess("notification_service", env)
    await service.start()
    try:
        yield service
    finally:
        # Never left consuming from the suite's queues, stealing later tests' messages.
        await service.stop()
    assert service.not_json == []  # LOG_FORMAT=json: every line


async def test_killed_after_sending_and_before_acking_sends_no_duplicate_on_restart(
    infra: StackConfig, topology: Topology, broker: Broker, pool: aiopg.Pool, users: FakeUserService, smtp: SmtpSink
) -> None:
    env = {
        **infra.service_env("notification"),
        "PATH": "/usr/bin:/bin",
        "SERVICE_CLIENT_SECRET": SECRET,
        "USER_SERVICE_NAME": users.name,
        "EVENTS_EXCHANGE": topology.exchange,
        "NOTIFICATION_QUEUES": topology.namespace,
        "SMTP_PORT": str(smtp.port),
        "LOG_FORMAT": "json",
    }
    newcomers = [new_user() for _ in range(5)]
    events = [verification_requested(u) for u in newcomers]
    by_address = {u["email"]: e.id for u, e in zip(newcomers, events, strict=True)}
    for event in events:
        await broker.publish(event)

    proxy = TcpProxy(infra.ports.amqp)
    await proxy.start()
    proxied = str(URL(env["AMQP_URL"]).with_port(proxy.port))
    smtp.data_gate = asyncio.Event()  # the server holds the first email until the broker cannot hear of it
    try:
        async with running({**env, "AMQP_URL": proxied, "AMQP_PREFETCH": "1"}) as first:
            [held] = await eventually(lambda: smtp.received, within=30, what="the first email in DATA")
            [crashed_on] = [by_address[address] for address in held.recipients]
            proxy.freeze()  # from here the ack is held, neither sent nor dropped
            smtp.data_gate.set()
            await eventually(lambda: _sent(pool, crashed_on), within=10, what="the email recorded as sent")
            assert await first.kill() == -signal.SIGKILL
        await proxy.cut()  # the held ack goes nowhere; the broker takes the delivery back
    finally:
        smtp.data_gate.set()
        await proxy.close()
    # A killed instance cannot leave Consul; do it for it (Consul's reaper would, a minute later).
    consul = consul_client(infra.consul_url)
    try:
        await first.leave_consul(consul)
    finally:
        await consul.close()
    assert _sent_counts(smtp, by_address) == {crashed_on: 1}  # the email went out; its ack did not

    async with running(env) as second:
        # Found sent, as it should be; or sent again, for the count below to catch.
        await eventually(
            lambda: (
                second.logged("notification_duplicate", event_id=crashed_on)
                or _sent_counts(smtp, by_address)[crashed_on] > 1
            ),
            within=30,
            what="the redelivery handled",
        )
        await eventually(
            lambda: len(_sent_counts(smtp, by_address)) == len(events),
            within=30,
            what="the other events' emails after the restart",
        )

    assert _sent_counts(smtp, by_address) == {e.id: 1 for e in events}  # duplicates 0, lost 0
    assert second.logged("notification_duplicate", event_id=crashed_on)
    # Every delivery acked: one left unacked would be back in the queue now that the instance stopped.
    for queue in (topology.queue, *topology.retry_queues, topology.dead_letters):
        assert await broker.ready(queue) == 0


async def _sent(pool: aiopg.Pool, event_id: str) -> bool:
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT status FROM notifications WHERE event_id = %s", (event_id,))
        return await cur.fetchone() == ("sent",)


def _sent_counts(smtp: SmtpSink, by_address: dict[str, str]) -> dict[str, int]:
    """Emails per event id that the SMTP server took, by their recipient."""
    counts: Counter[str] = Counter()
    for received in smtp.received:
        for address in received.recipients:
            counts[by_address[address]] += 1
    return dict(counts)
