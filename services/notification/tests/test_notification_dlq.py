"""``dlq list`` and ``dlq replay`` as an operator runs them: what they did, what is left, and why they stopped.

Both stop at ``--limit``, and a replay may stop partway (our queue refuses
a copy, the broker blocks, Ctrl-C): each says so, and says what it had
already replayed, since those letters are out of the DLQ.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager

import aio_pika
import pytest
from notification_support import Broker, Management, eventually, new_user, publish, verification_requested

from devstack.config import StackConfig
from mesh_common.events import Event
from mesh_common.testing import run_module
from notification_service.dlq import list_dead_letters
from notification_service.topology import Topology

DiskAlarm = Callable[[], AbstractAsyncContextManager[None]]  # the root conftest's fixture


async def _dead_letters(broker: Broker, topology: Topology, count: int) -> list[Event]:
    events = [verification_requested(new_user()) for _ in range(count)]
    for event in events:
        await publish(broker.channel.default_exchange, event, routing_key=topology.dead_letters)
    return events


async def _ready_is(broker: Broker, queue: str, count: int) -> bool:
    return await broker.ready(queue) == count


async def _cli(*args: str, infra: StackConfig, topology: Topology) -> tuple[int, str, str]:
    """``python -m notification_service ...`` as an operator runs it: exit status, stdout, stderr."""
    env = {"AMQP_URL": infra.amqp_url, "EVENTS_EXCHANGE": topology.exchange, "NOTIFICATION_QUEUES": topology.namespace}
    return await run_module("notification_service", *args, env=env)


async def test_list_and_replay_say_how_many_letters_are_left_and_when_their_limit_left_some(
    infra: StackConfig, broker: Broker, topology: Topology
) -> None:
    await _dead_letters(broker, topology, 3)
    dlq = topology.dead_letters

    status, out, err = await _cli("dlq", "list", "--limit", "2", infra=infra, topology=topology)
    assert status == 0, err
    assert f"2 dead letter(s) shown, of 3 in {dlq}" in out
    assert f"stopped at --limit 2, more remain in {dlq}: raise --limit" in out
    # The listing's letters come back when its connection closes.
    await eventually(lambda: _ready_is(broker, dlq, 3), within=10, what="the listed letters back")

    status, out, err = await _cli("dlq", "replay", "--limit", "2", infra=infra, topology=topology)
    assert status == 0, err
    assert f"2 dead letter(s) replayed to {topology.queue}, 1 left in {dlq}" in out
    assert "more remain" in out and "run again or raise --limit" in out

    await eventually(lambda: _ready_is(broker, dlq, 1), within=10, what="the letter left")
    status, out, err = await _cli("dlq", "replay", "--limit", "2", infra=infra, topology=topology)
    assert status == 0, err
    assert f"1 dead letter(s) replayed to {topology.queue}, 0 left in {dlq}" in out
    assert "more remain" not in out


@pytest.fixture
def one_message_queue(management: Management, own_topology: Topology) -> Iterator[Topology]:
    """``own_topology``, whose queue nacks what comes once it is past an operator policy's max-length of 1.

    A quorum queue takes one message past its limit (measured on 3.10), so a replay of three gets that far.
    """
    name = f"{own_topology.namespace}-max-length"
    pattern = f"^{re.escape(own_topology.queue)}$"
    definition = {"pattern": pattern, "definition": {"max-length": 1}, "apply-to": "queues", "priority": 0}
    management.request("PUT", f"/operator-policies/%2F/{name}", definition)
    try:
        deadline = time.monotonic() + 30
        while "max-length" not in (management.queue(own_topology.queue).get("effective_policy_definition") or {}):
            assert time.monotonic() < deadline, "the operator policy never applied"
            time.sleep(0.2)
        yield own_topology
    finally:
        management.delete(f"/operator-policies/%2F/{name}")


async def test_a_replay_cut_short_says_which_letters_it_had_replayed(
    infra: StackConfig, one_message_queue: Topology
) -> None:
    topology = one_message_queue
    async with await aio_pika.connect(infra.amqp_url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        broker = Broker(channel, await channel.get_exchange(topology.exchange), topology)
        events = await _dead_letters(broker, topology, 3)

        status, out, err = await _cli("dlq", "replay", infra=infra, topology=topology)

        assert status != 0
        assert "did not take a letter" in err
        # Those it had replayed are in our queue, out of the DLQ: the operator must know which.
        replayed = {e.id for e in events if e.id in out}
        assert 0 < len(replayed) < len(events)
        left = len(events) - len(replayed)
        assert f"{len(replayed)} dead letter(s) replayed to {topology.queue}, {left} left in" in out
        await eventually(lambda: _ready_is(broker, topology.dead_letters, left), within=10, what="the rest back")
    still_dead = {d.event_id for d in await list_dead_letters(infra.amqp_url, topology, limit=10)}
    assert still_dead == {e.id for e in events} - replayed


async def test_a_replay_during_a_resource_alarm_stops_at_its_timeout_and_says_why(
    infra: StackConfig, broker: Broker, topology: Topology, disk_alarm: DiskAlarm
) -> None:
    await _dead_letters(broker, topology, 1)

    async with disk_alarm():
        # The broker blocks the replay's connection at its first publish, and
        # confirms nothing until the alarm clears: run_module gives up at 30 s.
        status, out, err = await _cli("dlq", "replay", infra=infra, topology=topology)

    assert status != 0
    assert "not confirmed within" in err and "resource alarm" in err
    assert "replayed to" not in out
    # Never acked: the letter is still dead (its copy may have gone in too, once the alarm cleared).
    await eventually(lambda: _ready_is(broker, topology.dead_letters, 1), within=10, what="the letter, still dead")
