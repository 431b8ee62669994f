"""Accounts: register, read and change profiles."""

from __future__ import annotations

import uuid

import structlog
from aiohttp import web

from mesh_common.auth import PRINCIPAL
from mesh_common.db import DB
from mesh_common.outbox import OUTBOX_COMMITTED, enqueue, publishing
from mesh_common.problems import Forbidden, read_json_object
from mesh_common.requests import REQUEST_ID

from . import repository, validation
from .errors import AccountExists, UserNotFound
from .events import email_changed, user_registered
from .keys import PASSWORD_SLOTS, PASSWORDS, WRITE_SLOTS
from .tokens import USERS_READ
from .verification_handlers import send_code

log = structlog.get_logger()


async def register_user(request: web.Request) -> web.Response:
    passwords = request.app[PASSWORDS]
    registration = validation.registration(await read_json_object(request), passwords)
    # Hashed before we know whether the name is free, so that a duplicate
    # takes as long to refuse as a new account takes to create.
    async with request.app[PASSWORD_SLOTS]:
        password_hash = await passwords.hash(registration.password)
    try:
        async with request.app[WRITE_SLOTS], publishing(request.app[DB], request.app[OUTBOX_COMMITTED]) as cur:
            user = await repository.insert_user(
                cur,
                username=registration.username,
                email=registration.email,
                display_name=registration.display_name,
                password_hash=password_hash,
            )
            await enqueue(cur, user_registered(user, correlation_id=request[REQUEST_ID]))
            # The welcome mail is this code's: nothing else goes to the
            # address until it is proven.
            await send_code(cur, user, "registered", correlation_id=request[REQUEST_ID])
    except repository.AccountTaken:
        raise AccountExists("Choose another username, or log in if this is your account") from None
    log.info("user_registered", user_id=user.id)
    return web.json_response(user.profile(), status=201)


async def get_my_profile(request: web.Request) -> web.Response:
    user = await repository.get_user(request.app[DB], request[PRINCIPAL].user_id)
    if user is None:  # a valid token for an account that is gone
        raise UserNotFound()
    return web.json_response(user.profile())


async def update_my_profile(request: web.Request) -> web.Response:
    user_id = request[PRINCIPAL].user_id
    changes = validation.profile_changes(await read_json_object(request))
    try:
        async with request.app[WRITE_SLOTS], publishing(request.app[DB], request.app[OUTBOX_COMMITTED]) as cur:
            # Locked, so that two changes at once cannot both see the old
            # address and leave a code for one that is no longer the account's.
            user = await repository.fetch_user(cur, user_id, for_update=True)
            if user is None:
                raise UserNotFound()
            changed = await repository.update_user(cur, user, changes)
            address_changed = changed.email != user.email
            if address_changed:
                await send_code(cur, changed, "email_changed", correlation_id=request[REQUEST_ID])
                # Told to the old address, as it was: the greeting too, in
                # case whoever moved the account renamed it in the same PATCH.
                await enqueue(cur, email_changed(user, correlation_id=request[REQUEST_ID]))
    except repository.AccountTaken:
        raise AccountExists("Another account uses this email") from None
    log.info("user_updated", user_id=user_id, fields=sorted(changes), email_changed=address_changed)
    return web.json_response(changed.profile())


async def get_user(request: web.Request) -> web.Response:
    """A profile for other services (scope users:read), or for its own user."""
    principal = request[PRINCIPAL]
    try:
        # Python reads braces, "urn:uuid:", capitals and missing hyphens,
        # PostgreSQL does not: the canonical form is what is compared and
        # what goes to the query.
        canonical: str | None = str(uuid.UUID(request.match_info["id"]))
    except ValueError:
        canonical = None
    # Decided before any lookup, so that a refusal says nothing about the id.
    if not (principal.is_service and principal.has_scope(USERS_READ)) and principal.subject != canonical:
        raise Forbidden("Only the user themself or a service with users:read may read this profile")
    if canonical is None:
        raise UserNotFound()
    user = await repository.get_user(request.app[DB], canonical)
    if user is None:
        raise UserNotFound()
    return web.json_response(user.profile())
