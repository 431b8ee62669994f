"""docs/asyncapi.yaml lists exactly the events this service publishes, in their real shape."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft7Validator, FormatChecker

from mesh_common.events import EVENTS_EXCHANGE
from todo_service.events import EVENT_TYPES

ASYNCAPI = Path(__file__).resolve().parents[3] / "docs" / "asyncapi.yaml"


def document() -> dict[str, Any]:
    return yaml.safe_load(ASYNCAPI.read_text())


def messages_by_type(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {message["name"]: message for message in doc["components"]["messages"].values()}


def test_the_asyncapi_document_lists_every_event_type_the_code_publishes():
    doc = document()

    assert doc["asyncapi"].startswith("3.")
    documented = messages_by_type(doc)
    assert {name for name in documented if name.startswith("todo.")} == set(EVENT_TYPES)
    assert "user.registered" in documented
    channels = doc["channels"]
    addresses = {channel["address"] for channel in channels.values()}
    assert set(EVENT_TYPES) | {"user.registered", "notifications.events", "notifications.dead"} <= addresses
    exchange = doc["components"]["channelBindings"]["eventsExchange"]["amqp"]["exchange"]
    assert exchange["name"] == EVENTS_EXCHANGE and exchange["type"] == "topic"
    consumer = channels["notificationsEvents"]
    assert consumer["x-queue-arguments"]["x-queue-type"] == "quorum"
    assert consumer["x-policy"] == {"delivery-limit": 20, "dead-letter-exchange": "notifications.dlx"}
    consumed = {resolve(doc, message["$ref"])["name"] for message in consumer["messages"].values()}
    assert consumed == set(documented)
    user_data = doc["components"]["schemas"]["UserRegisteredEvent"]["allOf"][1]["properties"]["data"]
    assert set(user_data["required"]) == {"user_id", "username", "email", "display_name"}


def resolve(doc: dict[str, Any], ref: str) -> Any:
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


async def test_published_events_match_their_documented_schemas(client, alice, db):
    todo = await (
        await client.post(
            "/todos", json={"title": "Documented", "due_at": "2030-01-01T00:00:00Z"}, headers=alice.headers
        )
    ).json()
    await client.patch(f"/todos/{todo['id']}", json={"description": "with details"}, headers=alice.headers)
    await client.post(f"/todos/{todo['id']}/complete", headers=alice.headers)
    await client.post(f"/todos/{todo['id']}/reopen", headers=alice.headers)
    await client.delete(f"/todos/{todo['id']}", headers=alice.headers)
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT payload FROM outbox")
        events = [json.loads(bytes(payload)) for (payload,) in await cur.fetchall()]

    doc = document()
    documented = messages_by_type(doc)
    assert {event["type"] for event in events} == set(EVENT_TYPES)
    for event in events:
        payload_ref = documented[event["type"]]["payload"]["$ref"]
        Draft7Validator(
            {"$ref": payload_ref, "components": doc["components"]}, format_checker=FormatChecker()
        ).validate(event)
