"""Tokens: log in, refresh, log out, service credentials, and the JWKS.

Every refusal here is one body per kind, whatever the reason behind it: an
unknown user and a wrong password are the same 401, and so are an unknown,
expired, spent or revoked refresh token, or one whose session ended. The
reason goes to the log only.
"""

from __future__ import annotations

import hmac

import redis.exceptions
import structlog
from aiohttp import web

from mesh_common.db import DB
from mesh_common.problems import FeatureUnavailable, TooManyRequests, read_json_object

from . import refresh_tokens, repository, validation
from .digests import sha256
from .errors import InvalidClient, InvalidCredentials, InvalidRefreshToken
from .keys import KEY_STORE, PASSWORD_SLOTS, PASSWORDS, SETTINGS, THROTTLE, TOKENS, WRITE_SLOTS
from .tokens import USERS_READ

log = structlog.get_logger()
# RFC 6749 section 5.1: responses carrying tokens must not be cached.
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _token_pair(request: web.Request, user_id: str, refresh_token: str) -> web.Response:
    access = request.app[TOKENS].for_user(user_id)
    body = {
        "access_token": access.token,
        "token_type": "Bearer",
        "expires_in": access.expires_in,
        "refresh_token": refresh_token,
    }
    return web.json_response(body, headers=NO_STORE)


async def log_in(request: web.Request) -> web.Response:
    login, password = validation.credentials(await read_json_object(request))
    async with request.app[PASSWORD_SLOTS]:
        user_id = await _authenticate(request.app, login, password)
    async with request.app[WRITE_SLOTS]:
        refresh = await refresh_tokens.start_family(request.app[DB], user_id, request.app[SETTINGS].tokens)
    log.info("login_succeeded", user_id=user_id)
    return _token_pair(request, user_id, refresh)


async def _authenticate(app: web.Application, login: str, password: str) -> str:
    """The id of the account ``login`` names if ``password`` is right; else a 401 or 429."""
    throttle, passwords, pool = app[THROTTLE], app[PASSWORDS], app[DB]
    # Looked up first, so that every spelling of one account counts against
    # it. An unknown name costs the same query and the same Redis call.
    folded, found = await repository.find_credentials(pool, login)
    try:
        attempt = await throttle.begin(folded, found[0] if found else None)
    except redis.exceptions.RedisError as exc:
        # Without the counter we cannot bound guessing: refuse rather than
        # let logins through unthrottled. Only logins: the instance is well,
        # and its callers' breakers must not count this against it.
        log.error("login_throttle_unavailable", error=type(exc).__name__)
        raise FeatureUnavailable("Logins are unavailable for a moment", headers={"Retry-After": "5"}) from None
    if not attempt.allowed:
        raise TooManyRequests(
            "Too many failed logins for this account; try again later",
            headers={"Retry-After": str(attempt.retry_after)},
        )
    # An unknown user still costs one argon2 verify (against a dummy hash),
    # so that the answer's timing does not tell whether the account exists.
    verdict = await passwords.verify(found[1] if found else None, password)
    if found is None or not verdict.matched:
        log.info("login_failed", known_account=found is not None)
        raise InvalidCredentials()
    user_id, stored_hash = found
    await throttle.succeeded(attempt)
    if verdict.as_typed or passwords.needs_rehash(stored_hash):
        # The password is in hand only now: upgrade a hash made with older,
        # weaker parameters, or of the password before it was normalized.
        new_hash = await passwords.rehash(password, stored_hash)
        async with app[WRITE_SLOTS]:
            replaced = await repository.set_password_hash(pool, user_id, new_hash, replacing=stored_hash)
        if replaced:
            log.info("password_rehashed", user_id=user_id)
    return user_id


async def refresh_session(request: web.Request) -> web.Response:
    token = validation.refresh_token(await read_json_object(request))
    db = request.app[DB]
    try:
        if not await refresh_tokens.known(db, token):
            raise refresh_tokens.RefreshTokenRejected("unknown")
        async with request.app[WRITE_SLOTS]:
            rotated = await refresh_tokens.rotate(db, token, request.app[SETTINGS].tokens)
    except refresh_tokens.RefreshTokenRejected as exc:
        log.info("refresh_rejected", reason=exc.reason)
        raise InvalidRefreshToken() from None
    return _token_pair(request, rotated.user_id, rotated.refresh_token)


async def log_out(request: web.Request) -> web.Response:
    # Idempotent, and silent about tokens it does not know.
    token = validation.refresh_token(await read_json_object(request))
    db = request.app[DB]
    if await refresh_tokens.known(db, token):
        async with request.app[WRITE_SLOTS]:
            await refresh_tokens.revoke_family(db, token)
    return web.Response(status=204)


async def issue_service_token(request: web.Request) -> web.Response:
    """OAuth 2.0 client credentials for other services (SERVICE_CLIENTS)."""
    client_id, secret = validation.client_credentials(await read_json_object(request))
    throttle = request.app[THROTTLE]
    attempt = None
    try:
        attempt = await throttle.begin_client(client_id, request.remote or "")
    except redis.exceptions.RedisError as exc:
        # Unlike a login, let it through: only services inside the network
        # reach this (the gateway does not route it), and their calls to us
        # need the token, so refusing would make a Redis outage theirs too.
        log.error("service_token_throttle_unavailable", error=type(exc).__name__)
    if attempt is not None and not attempt.allowed:
        raise TooManyRequests(
            "Too many wrong client secrets; try again later", headers={"Retry-After": str(attempt.retry_after)}
        )
    expected = dict(request.app[SETTINGS].service_clients).get(client_id)
    # compare_digest takes as long for a wrong secret as for a nearly right
    # one, but not for one of another length: so digests, all of one length,
    # are compared. An unknown client pays for a comparison too.
    matched = hmac.compare_digest(sha256(secret), sha256(expected or secret))
    if expected is None or not matched:
        log.warning("service_token_refused", client_id=client_id[:64])
        raise InvalidClient()
    if attempt is not None:
        await throttle.succeeded(attempt)
    issued = request.app[TOKENS].for_service(client_id)
    body = {
        "access_token": issued.token,
        "token_type": "Bearer",
        "expires_in": issued.expires_in,
        "scope": USERS_READ,
    }
    return web.json_response(body, headers=NO_STORE)


async def get_jwks(request: web.Request) -> web.Response:
    return web.json_response(request.app[KEY_STORE].jwks(), headers={"Cache-Control": "public, max-age=60"})
