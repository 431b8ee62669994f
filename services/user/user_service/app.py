"""``create_app``: the user-service factory. Sync, with no side effects."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web

from mesh_common.amqp import amqp_ctx
from mesh_common.app import service_app
from mesh_common.auth import auth_middleware
from mesh_common.consul import consul_ctx
from mesh_common.db import database_ctx
from mesh_common.jwks import JwksVerifier
from mesh_common.outbox import OUTBOX_COMMITTED, OUTBOX_MIGRATIONS, prune_published
from mesh_common.pruning import prune_ctx
from mesh_common.registration import registration_ctx
from mesh_common.relay import outbox_relay_ctx

from .contexts import open_login_throttle, open_passwords, redis_ctx, signing_keys_ctx
from .keys import PASSWORD_SLOTS, SETTINGS, WRITE_SLOTS
from .passwords import HashingSlots
from .refresh_tokens import prune_families
from .routes import PUBLIC_ROUTES, setup_routes
from .settings import Settings

# Inside the package, so that they ship in the wheel the images install.
MIGRATIONS = (Path(__file__).resolve().parent / "migrations", OUTBOX_MIGRATIONS)


def create_app(settings: Settings, *, verifier: JwksVerifier | None = None, register: bool = True) -> web.Application:
    """The user-service app.

    ``verifier`` replaces the one reading our own key table (tests of token
    handling elsewhere use it); ``register=False`` keeps an instance out of
    Consul, for tests serving it on a port nothing else should find.
    """
    app = service_app(settings.service, middlewares=[auth_middleware(public=PUBLIC_ROUTES)])
    app[SETTINGS] = settings
    # Bulkheads, so that a storm of logins cannot slow everything else down.
    # Logins and registrations beyond what the hashing threads can absorb
    # wait here, before they cost anything: a burst of them would otherwise
    # all query Redis and PostgreSQL at once, then queue for the hasher.
    app[PASSWORD_SLOTS] = HashingSlots(2 * settings.passwords.workers, wait=settings.passwords.queue_seconds)
    # Writes wait for their commit to reach the disk; when the disk stalls
    # (hundreds of milliseconds on a busy shared disk), they must not hold
    # every connection and make every read wait too.
    app[WRITE_SLOTS] = asyncio.Semaphore(settings.db_write_slots)
    app[OUTBOX_COMMITTED] = asyncio.Event()
    setup_routes(app)
    app.cleanup_ctx.extend(
        [
            database_ctx(settings.database_url, MIGRATIONS, maxsize=settings.db_pool_size),
            redis_ctx(settings.redis_url),  # not required: only logins need it
            open_login_throttle,
            # It only publishes, through the outbox: logins and sign-ups
            # go on while the broker is away, and their events wait.
            amqp_ctx(settings.amqp_url, wait_for_broker=False),
            outbox_relay_ctx(),
            prune_ctx(
                settings.prune,
                [prune_published(settings.prune.outbox_retention), prune_families(settings.tokens.refresh_retention)],
            ),
            open_passwords,
            signing_keys_ctx(verifier),
        ]
    )
    if register:
        # Last: an instance joins the healthy set only once it can serve.
        app.cleanup_ctx.extend([consul_ctx(settings.service), registration_ctx()])
    return app
