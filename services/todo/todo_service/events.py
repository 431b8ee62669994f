"""The events this service publishes on ``todo-mesh.events``.

Each one is written to the outbox in the transaction of the change it
describes (todos.py), and carries the whole todo as it is after the change,
``due_at`` included, so that consumers such as the notification-service
never need to read this service's database. The contracts are written down
in docs/asyncapi.yaml, which a test keeps in step with ``EVENT_TYPES``.
"""

from __future__ import annotations

from mesh_common.events import Event

from .model import Todo

TODO_CREATED = "todo.created"
TODO_UPDATED = "todo.updated"
TODO_COMPLETED = "todo.completed"
TODO_REOPENED = "todo.reopened"
TODO_DELETED = "todo.deleted"
EVENT_TYPES = (TODO_CREATED, TODO_UPDATED, TODO_COMPLETED, TODO_REOPENED, TODO_DELETED)


def todo_event(event_type: str, todo: Todo, *, correlation_id: str) -> Event:
    return Event(type=event_type, user_id=todo.owner_id, data=todo.snapshot(), correlation_id=correlation_id)
