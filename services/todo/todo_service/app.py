"""``create_app``: the todo-service factory. Sync, with no side effects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web

from mesh_common.amqp import amqp_ctx
from mesh_common.app import CleanupCtx, service_app
from mesh_common.auth import VERIFIER, auth_middleware, jwks_ctx
from mesh_common.consul import consul_ctx
from mesh_common.db import DB, database_ctx
from mesh_common.discovery import watch_services_ctx
from mesh_common.http import SERVICE_CLIENT, http_session_ctx
from mesh_common.jwks import JwksVerifier
from mesh_common.outbox import OUTBOX_COMMITTED, OUTBOX_MIGRATIONS, prune_published
from mesh_common.pruning import prune_ctx
from mesh_common.registration import registration_ctx
from mesh_common.relay import outbox_relay_ctx

from .idempotency import prune_expired
from .keys import OWNERS, SETTINGS, TODOS
from .owners import OwnerDirectory, OwnerLookup
from .routes import setup_routes
from .settings import Settings
from .todos import Todos

# Inside the package, so that they ship in the wheel the images install.
MIGRATIONS = (Path(__file__).resolve().parent / "migrations", OUTBOX_MIGRATIONS)


def todos_ctx(owners: OwnerLookup | None) -> CleanupCtx:
    @asynccontextmanager
    async def open_todos(app: web.Application) -> AsyncIterator[None]:
        app[TODOS] = Todos(app[DB], app[OUTBOX_COMMITTED])
        app[OWNERS] = owners or OwnerDirectory(app[SERVICE_CLIENT], app[SETTINGS].user_service)
        yield

    return open_todos


def create_app(
    settings: Settings, *, verifier: JwksVerifier | None = None, owners: OwnerLookup | None = None
) -> web.Application:
    """The todo-service app.

    Tests may pass ``verifier`` instead of the JWKS fetched from the
    user-service, and ``owners`` instead of the profiles fetched from it.
    """
    app = service_app(settings.service, middlewares=[auth_middleware()])
    app[SETTINGS] = settings
    app[OUTBOX_COMMITTED] = asyncio.Event()
    contexts = [
        database_ctx(settings.database_url, MIGRATIONS),
        # Todos are written with their events to the outbox: serving needs no
        # broker, so the instance starts and stays ready without one.
        amqp_ctx(settings.amqp_url, wait_for_broker=False),
        consul_ctx(settings.service),
        watch_services_ctx(settings.user_service),
        http_session_ctx(),
        todos_ctx(owners),
    ]
    if verifier is None:
        contexts.append(
            jwks_ctx(issuer=settings.jwt_issuer, audience=settings.jwt_audience, service=settings.user_service)
        )
    else:
        app[VERIFIER] = verifier
    contexts += [
        outbox_relay_ctx(),
        prune_ctx(
            settings.prune,
            [prune_published(settings.prune.outbox_retention), prune_expired(settings.idempotency_key_ttl)],
        ),
        registration_ctx(),  # last: registered only once everything above is ready
    ]
    app.cleanup_ctx.extend(contexts)
    setup_routes(app)
    return app
