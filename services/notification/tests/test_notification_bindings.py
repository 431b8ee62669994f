"""The consumer binds its queue to every event it handles, whatever the broker loaded.

A broker keeps the definitions it loaded at boot. One not restarted when
the service gained an event type (a compose stack upgraded with
``up -d --build``, which keeps the rabbitmq container) routed that event to
``todo-mesh.unrouted``: the relay counted it as sent, and no email went out.
"""

from __future__ import annotations

import urllib.parse

import aio_pika
from notification_support import Management, eventually, new_user, publish, verification_requested

from devstack.config import StackConfig
from mesh_common.events import Event
from notification_service.consumer import EventConsumer
from notification_service.notifier import Outcome
from notification_service.topology import ROUTING_KEYS, Topology


class Recorder:
    def __init__(self) -> None:
        self.types: list[str] = []

    async def handle(self, event: Event) -> Outcome | None:
        self.types.append(event.type)
        return None


async def test_an_event_the_broker_was_never_told_to_route_to_us_still_arrives(
    infra: StackConfig, own_topology: Topology, management: Management
) -> None:
    topology, handler = own_topology, Recorder()
    key = "user.email_verification_requested"
    assert key in ROUTING_KEYS
    exchange, queue = (urllib.parse.quote(name, safe="") for name in (topology.exchange, topology.queue))
    # As a broker that loaded the definitions from before the event existed.
    management.delete(f"/bindings/%2F/e/{exchange}/q/{queue}/{urllib.parse.quote(key, safe='')}")
    bound = management.request("GET", f"/bindings/%2F/e/{exchange}/q/{queue}")
    assert key not in {b["routing_key"] for b in bound}
    async with (
        await aio_pika.connect_robust(infra.amqp_url) as connection,
        await aio_pika.connect_robust(infra.amqp_url) as publishing,
    ):
        consumer = EventConsumer(connection, handler, topology, publishing=publishing, prefetch=10, retry_limit=10)
        await consumer.start()
        try:
            channel = await connection.channel()
            await publish(await channel.get_exchange(topology.exchange), verification_requested(new_user()))
            await eventually(lambda: handler.types == [key], within=10, what="the event handled")
        finally:
            await consumer.stop(drain_timeout=5)
    bound = management.request("GET", f"/bindings/%2F/e/{exchange}/q/{queue}")
    assert {b["routing_key"] for b in bound} >= set(ROUTING_KEYS)
