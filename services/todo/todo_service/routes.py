"""The todo-service's routes, each named (the auth middleware and tests use the names).

Paths are plain: the gateway publishes them under ``/api/v1``.
"""

from __future__ import annotations

from aiohttp import web

from . import handlers


def setup_routes(app: web.Application) -> None:
    router = app.router
    router.add_post("/todos", handlers.create_todo, name="todos.create")
    router.add_get("/todos", handlers.list_todos, name="todos.list")
    router.add_get("/todos/{todo_id}", handlers.get_todo, name="todos.get")
    router.add_patch("/todos/{todo_id}", handlers.update_todo, name="todos.update")
    router.add_delete("/todos/{todo_id}", handlers.delete_todo, name="todos.delete")
    router.add_post("/todos/{todo_id}/complete", handlers.complete_todo, name="todos.complete")
    router.add_post("/todos/{todo_id}/reopen", handlers.reopen_todo, name="todos.reopen")
    router.add_get("/openapi.json", handlers.get_openapi, name="openapi")
