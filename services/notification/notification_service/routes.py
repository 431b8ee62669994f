"""URL map of the notification-service."""

from __future__ import annotations

from aiohttp import web

from . import handlers


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/notifications", handlers.list_notifications, name="notifications.list")
    app.router.add_get("/openapi.json", handlers.get_openapi, name="openapi")
