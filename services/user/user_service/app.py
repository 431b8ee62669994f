"""``create_app``: the user-service factory. Sync, with no side effects."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from mesh_common.app import service_app
from mesh_common.consul import consul_ctx, registration_ctx
from mesh_common.db import database_ctx

from .settings import Settings

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def create_app(settings: Settings) -> web.Application:
    app = service_app(settings.service)
    app.cleanup_ctx.extend(
        [
            database_ctx(settings.database_url, MIGRATIONS),
            consul_ctx(settings.service.consul_url),
            registration_ctx(),
        ]
    )
    return app
