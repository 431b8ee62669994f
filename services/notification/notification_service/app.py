"""``create_app``: the notification-service factory. Sync, with no side effects."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web

from mesh_common.amqp import amqp_ctx
from mesh_common.app import CleanupCtx, service_app
from mesh_common.auth import VERIFIER, auth_middleware, jwks_ctx
from mesh_common.consul import consul_ctx
from mesh_common.db import database_ctx
from mesh_common.discovery import watch_services_ctx
from mesh_common.http import http_session_ctx
from mesh_common.jwks import JwksVerifier
from mesh_common.pruning import prune_ctx
from mesh_common.registration import registration_ctx

from .keys import SETTINGS, STOPS
from .retention import prune_jobs
from .routes import setup_routes
from .settings import Settings
from .stops import Stops
from .workers import consumer_ctx, delivery_ctx, scheduler_ctx

# Inside the package, so that they ship in the wheel the images install.
MIGRATIONS = (Path(__file__).resolve().parent / "migrations",)


def create_app(settings: Settings, *, verifier: JwksVerifier | None = None) -> web.Application:
    """The HTTP API, the event consumer, the reminder scheduler and the pruner, in one app.

    ``verifier`` replaces the JWKS fetched from the user-service (tests).
    """
    app = service_app(settings.service, middlewares=[auth_middleware()])
    app[SETTINGS] = settings
    app[STOPS] = Stops()
    app.on_shutdown.append(app[STOPS].begin)
    setup_routes(app)
    if verifier is None:
        verifier_ctx = jwks_ctx(
            issuer=settings.jwt_issuer, audience=settings.jwt_audience, service=settings.user_service
        )
    else:
        verifier_ctx = given_verifier_ctx(verifier)
    app.cleanup_ctx.extend(
        [
            database_ctx(settings.database_url, MIGRATIONS),
            amqp_ctx(settings.amqp_url),
            amqp_ctx(settings.amqp_url, publishing=True),  # the consumer's copies: publisher.py
            consul_ctx(settings.service),
            watch_services_ctx(settings.user_service),
            http_session_ctx(),
            verifier_ctx,
            delivery_ctx,
            consumer_ctx,
            scheduler_ctx,
            prune_ctx(settings.prune, prune_jobs(settings.retention)),
            registration_ctx(),  # last: registered only once everything above is ready
        ]
    )
    return app


def given_verifier_ctx(verifier: JwksVerifier) -> CleanupCtx:
    @asynccontextmanager
    async def use_verifier(app: web.Application) -> AsyncIterator[None]:
        app[VERIFIER] = verifier
        yield

    return use_verifier
