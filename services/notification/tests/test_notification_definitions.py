"""rabbitmq/definitions.json declares what the service expects, and the broker applies it."""

from __future__ import annotations

import json
import re
import time
from typing import Any

from notification_support import DEFINITIONS, Management

from mesh_common.events import EVENTS_EXCHANGE
from notification_service.topology import RETRY_DELAYS, ROUTING_KEYS, Topology


def definitions() -> dict[str, Any]:
    return json.loads(DEFINITIONS.read_text())


def policy_for(queue: str, policies: list[dict[str, Any]]) -> dict[str, Any]:
    [policy] = [p for p in queue_policies(policies) if re.search(p["pattern"], queue)]  # exactly one applies
    return policy["definition"]


def queue_policies(policies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for p in policies if p["apply-to"] in {"queues", "all"}]


def test_definitions_declare_the_topology_the_service_expects() -> None:
    doc = definitions()
    topology = Topology()
    queues = {q["name"]: q["arguments"] for q in doc["queues"]}
    bindings = {(b["source"], b["destination"], b["routing_key"]) for b in doc["bindings"]}

    for name in (topology.queue, topology.dead_letters, *topology.retry_queues):
        assert queues[name]["x-queue-type"] == "quorum", name
    ours = {(source, key) for source, destination, key in bindings if destination == topology.queue}
    assert ours == {(topology.exchange, key) for key in ROUTING_KEYS}  # the service's own list, no more, no less

    # Poison: delivery-limit, then the dead-letter exchange, which routes to the DLQ, losing nothing.
    main = policy_for(topology.queue, doc["policies"])
    assert main["delivery-limit"] >= 1
    assert (main["dead-letter-exchange"], topology.dead_letters, "") in bindings
    assert main["dead-letter-exchange"] == topology.dead_letter_exchange  # where the consumer's letters go too
    assert (main["dead-letter-strategy"], main["overflow"]) == ("at-least-once", "reject-publish")

    # Retries: each queue holds its messages for its delay, then hands them back to ours.
    for name, (_, seconds) in zip(topology.retry_queues, RETRY_DELAYS, strict=True):
        assert queues[name]["x-message-ttl"] == int(seconds * 1000), name
        retry = policy_for(name, doc["policies"])
        assert (retry["dead-letter-exchange"], retry["dead-letter-routing-key"]) == ("", topology.queue)
        assert retry["dead-letter-strategy"] == "at-least-once"
    # The DLQ keeps what it gets until someone replays it: no limit, no TTL, no dead-lettering.
    assert not [p for p in queue_policies(doc["policies"]) if re.search(p["pattern"], topology.dead_letters)]


def test_events_no_queue_is_bound_for_are_parked_not_dropped() -> None:
    doc = definitions()
    exchanges = {x["name"]: x for x in doc["exchanges"]}
    queues = {q["name"]: q["arguments"] for q in doc["queues"]}
    [policy] = [
        p for p in doc["policies"] if p["apply-to"] in {"exchanges", "all"} and re.search(p["pattern"], EVENTS_EXCHANGE)
    ]
    alternate = policy["definition"]["alternate-exchange"]
    assert (exchanges[alternate]["type"], exchanges[alternate]["durable"]) == ("fanout", True)
    [parked] = [b["destination"] for b in doc["bindings"] if b["source"] == alternate]
    assert queues[parked]["x-queue-type"] == "quorum"
    # Kept until someone looks: no limit, no TTL.
    assert not [p for p in queue_policies(doc["policies"]) if re.search(p["pattern"], parked)]


def test_the_broker_applies_our_policies_to_the_real_queues(management: Management) -> None:
    # Definitions load at broker boot; importing them again is what a
    # changed file needs on a running broker, and is idempotent otherwise.
    management.import_definitions(definitions())
    topology = Topology()
    expected = {
        topology.queue: policy_for(topology.queue, definitions()["policies"]),
        **{name: policy_for(name, definitions()["policies"]) for name in topology.retry_queues},
    }
    deadline = time.monotonic() + 30
    while True:
        applied = {name: management.queue(name).get("effective_policy_definition") or {} for name in expected}
        if applied == expected:
            break
        assert time.monotonic() < deadline, f"policies not applied: {applied}"
        time.sleep(0.5)
    assert management.queue(topology.dead_letters)["type"] == "quorum"
    [alternate] = [p["name"] for p in definitions()["policies"] if p["apply-to"] == "exchanges"]
    while management.request("GET", f"/exchanges/%2F/{EVENTS_EXCHANGE}").get("policy") != alternate:
        assert time.monotonic() < deadline, "the events exchange's alternate exchange never applied"
        time.sleep(0.5)
