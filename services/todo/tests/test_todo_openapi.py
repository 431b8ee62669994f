"""The todo-service's OpenAPI document: what it says matches what the service does."""

from __future__ import annotations

import uuid

from jsonschema import Draft202012Validator, FormatChecker

from todo_service.openapi import openapi_document

from .conftest import create


async def test_openapi_gives_a_default_priority_to_a_new_todo_and_none_to_a_change(client, alice):
    # A generated client fills defaults in: one on a change would reset a
    # priority the change left out, where the service keeps it.
    schemas = openapi_document()["components"]["schemas"]
    assert schemas["NewTodo"]["properties"]["priority"]["default"] == "normal"
    assert "default" not in schemas["TodoChanges"]["properties"]["priority"]
    todo = await create(client, alice, priority="high")
    resp = await client.patch(f"/todos/{todo['id']}", json={"title": "renamed"}, headers=alice.headers)
    assert resp.status == 200 and (await resp.json())["priority"] == "high"


async def test_openapi_describes_every_route_and_the_real_responses(client, alice):
    resp = await client.get("/openapi.json")  # no token needed
    assert resp.status == 200
    document = await resp.json()
    assert document == openapi_document()
    assert document["openapi"].startswith("3.1")

    documented = {
        (method.upper(), "/api/v1" + path)
        for path, item in document["paths"].items()
        for method in item
        if method != "parameters"
    }
    served = {
        (route.method, "/api/v1" + route.resource.canonical)
        for route in client.app.router.routes()
        if route.method != "HEAD" and route.resource.canonical.startswith("/todos")
    }
    assert documented == served

    def validate(schema_name: str, instance: object) -> None:
        schema = {"$ref": f"#/components/schemas/{schema_name}", "components": document["components"]}
        Draft202012Validator(schema, format_checker=FormatChecker()).validate(instance)

    todo = await create(client, alice, description="d", due_at="2030-01-01T00:00:00Z", priority="low")
    validate("Todo", todo)
    validate("TodoPage", await (await client.get("/todos", params={"limit": "1"}, headers=alice.headers)).json())
    missing = await client.get(f"/todos/{uuid.uuid4()}", headers=alice.headers)
    validate("Problem", await missing.json())
    invalid = await client.post("/todos", json={"title": ""}, headers=alice.headers)
    validate("Problem", await invalid.json())

    # The headers of a replayed create are all declared, and the documented
    # key schema takes exactly the keys the service does.
    create_op = document["paths"]["/todos"]["post"]
    declared = set(create_op["responses"]["201"]["headers"])
    key_schema = next(p["schema"] for p in create_op["parameters"] if p["name"] == "Idempotency-Key")
    headers = {**alice.headers, "Idempotency-Key": "replay-1"}
    for _ in range(2):
        replayed = await client.post("/todos", json={"title": "once"}, headers=headers)
    assert replayed.status == 201 and replayed.headers["Idempotent-Replayed"] == "true"
    assert {"ETag", "Location", "Idempotent-Replayed"} <= declared
    for key in ("another-key", "x" * 255, "has space", "clé-1", "x" * 256, ""):
        documented_ok = Draft202012Validator(key_schema, format_checker=FormatChecker()).is_valid(key)
        answer = await client.post("/todos", json={"title": "k"}, headers={**alice.headers, "Idempotency-Key": key})
        assert (answer.status == 201) == documented_ok, (key, answer.status)


async def test_the_shared_middlewares_answers_are_documented_where_they_can_come(client, alice):
    document = openapi_document()
    todo = await create(client, alice)
    answers = {
        # A body that is not JSON, too large, or of another media type: any operation with a body.
        ("post", "/todos"): [
            await client.post("/todos", data="{}", headers={**alice.headers, "Content-Type": "text/plain"}),
            await client.post(
                "/todos", data=b"x" * (65 * 1024), headers={**alice.headers, "Content-Type": "application/json"}
            ),
        ],
        ("patch", "/todos/{todo_id}"): [
            await client.patch(
                f"/todos/{todo['id']}", data="{}", headers={**alice.headers, "Content-Type": "text/plain"}
            ),
        ],
    }
    for (method, path), responses in answers.items():
        for response in responses:
            assert response.content_type == "application/problem+json"
            assert str(response.status) in document["paths"][path][method]["responses"], (method, path, response.status)
    # And the database's 503 on every operation; a lost COMMIT's 500 on every
    # change (each commits with its event), never on a read.
    changes = {("post", "/todos"), ("patch", "/todos/{todo_id}"), ("delete", "/todos/{todo_id}")}
    changes |= {("post", "/todos/{todo_id}/complete"), ("post", "/todos/{todo_id}/reopen")}
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method != "parameters":
                assert "503" in operation["responses"], method
                lost = operation["responses"].get("500", {}).get("description", "")
                assert lost.startswith("OUTCOME_UNKNOWN:") == ((method, path) in changes), (method, path)
