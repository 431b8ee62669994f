"""Typed app state of the todo-service."""

from aiohttp import web

from .owners import OwnerLookup
from .settings import Settings
from .todos import Todos

SETTINGS = web.AppKey("todo.settings", Settings)
TODOS = web.AppKey("todo.todos", Todos)
OWNERS = web.AppKey("todo.owners", OwnerLookup)
