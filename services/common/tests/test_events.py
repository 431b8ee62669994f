"""Event.from_json: whatever the body, a ValueError when it is not an envelope."""

from __future__ import annotations

import json
import uuid

import pytest

from mesh_common.events import Event

USER_ID = str(uuid.uuid4())


def envelope(**changes: object) -> bytes:
    event = Event(type="todo.completed", user_id=USER_ID, data={"id": "t"}, correlation_id="c")
    return json.dumps({**json.loads(event.to_json()), **changes}).encode()


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"\xff\xfe",
        envelope(id="not-a-uuid"),
        # Looked up by it: "" or a path made a 404 about no user, taken for an outage.
        envelope(user_id=""),
        envelope(user_id="../health"),
        envelope(user_id="not-a-uuid"),
        # What uuid.UUID reads as another id than the one written.
        envelope(user_id=" " + USER_ID[1:]),
        envelope(user_id="+" + USER_ID[1:]),
        envelope(user_id=USER_ID.replace("-", "")),
        envelope(version="one"),
        # Infinity (of two "version" keys, the last one counts).
        envelope()[:-1] + b', "version": 1e999}',
        envelope()[:-1] + b', "version": NaN}',
        # What int() read as 1: a shape the event never said it had.
        envelope(version="1"),
        envelope(version=True),
        envelope(version=1.9),
        envelope(version=None),
        # Nested deep enough for a RecursionError, in a small body.
        b"[" * 100_000 + b"]" * 100_000,
        b'{"type": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ],
)
def test_a_body_that_is_not_an_envelope_is_a_value_error(body: bytes) -> None:
    with pytest.raises(ValueError):
        Event.from_json(body)


@pytest.mark.parametrize("field", ["type", "user_id", "correlation_id", "occurred_at"])
@pytest.mark.parametrize("value", [None, 42, ["u"], {"id": "u"}, True])
def test_a_field_that_is_not_a_string_is_a_value_error_not_its_repr(field: str, value: object) -> None:
    # str(None) is "None": a null user_id was a user of that name, not found,
    # and the event handled as one whose user was deleted.
    with pytest.raises(ValueError):
        Event.from_json(envelope(**{field: value}))


def test_a_version_of_1_point_0_is_the_integer_1() -> None:
    # JSON Schema's integer: a number without a fraction, whatever its spelling.
    assert Event.from_json(envelope()[:-1] + b', "version": 1.0}').version == 1


def test_an_envelope_round_trips() -> None:
    event = Event(type="todo.completed", user_id=USER_ID, data={"id": "t"}, correlation_id="c")
    assert Event.from_json(event.to_json()) == event
