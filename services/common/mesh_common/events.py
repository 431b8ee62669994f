"""The envelope every domain event travels in.

Contracts are written down in docs/asyncapi.yaml. ``type`` doubles as the
AMQP routing key (``todo.completed``); ``version`` lets consumers refuse
shapes they do not know instead of guessing.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

EVENTS_EXCHANGE = "todo-mesh.events"
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


@dataclass(frozen=True, slots=True)
class Event:
    type: str
    user_id: str
    data: dict[str, Any]
    correlation_id: str
    version: int = 1
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    occurred_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Event:
        """Parse an envelope; raises ``ValueError`` on anything malformed."""
        try:
            body = json.loads(raw)
            return cls(
                type=_string(body, "type"),
                user_id=_user_id(body),
                data=dict(body["data"]),
                correlation_id=_string(body, "correlation_id"),
                version=_version(body["version"]),
                id=str(uuid.UUID(str(body["id"]))),
                occurred_at=_string(body, "occurred_at"),
            )
        # Not ValueErrors, but as malformed: RecursionError, arrays or objects
        # nested thousands deep, which fit in a small body.
        except (KeyError, TypeError, RecursionError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"malformed event: {type(exc).__name__}") from None


def _string(body: dict[str, Any], key: str) -> str:
    # Not str(value): a null user_id became the user "None", whom nobody
    # knows, and the event was handled as one whose user was deleted.
    value = body[key]
    if not isinstance(value, str):
        raise ValueError(f"malformed event: {key} is not a string")
    return value


def _user_id(body: dict[str, Any]) -> str:
    # A UUID, as docs/asyncapi.yaml says: consumers look the user up by it,
    # and "" or "a/b" made a path that answered a 404 about no user, taken
    # for an outage and retried for a day.
    # Written as one, too: uuid.UUID reads " 1_2..." or "+12..." as another id.
    value = _string(body, "user_id")
    if _UUID.fullmatch(value) is None:
        raise ValueError("malformed event: user_id is not a UUID")
    return value.lower()


def _version(value: Any) -> int:
    # An integer, as docs/asyncapi.yaml says: 1.0 is one too (JSON Schema's
    # integer is a number without a fraction), but not "1", true or 1.9,
    # which int() made 1, a shape they never said they were.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("malformed event: version is not an integer")
    return value
