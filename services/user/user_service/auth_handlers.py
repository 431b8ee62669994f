"""Tokens: log in, refresh, log out (here or everywhere), a new password, service credentials, and the JWKS.

Every refusal here is one body per kind, whatever the reason behind it: an
unknown user and a wrong password are the same 401, and so are an unknown,
expired, spent or revoked refresh token, or one whose session ended. The
reason goes to the log only.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable

import redis.exceptions
import structlog
from aiohttp import web

from mesh_common.auth import PRINCIPAL
from mesh_common.db import DB
from mesh_common.outbox import OUTBOX_COMMITTED, enqueue, publishing
from mesh_common.problems import Conflict, FeatureUnavailable, TooManyRequests, read_json_object
from mesh_common.requests import REQUEST_ID

from . import refresh_tokens, repository, validation
from .digests import sha256
from .errors import InvalidClient, InvalidCredentials, InvalidRefreshToken, UserNotFound, WrongPassword
from .events import password_changed
from .keys import KEY_STORE, PASSWORD_SLOTS, PASSWORDS, SETTINGS, THROTTLE, TOKENS, WRITE_SLOTS
from .throttle import Attempt
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
        account = await _authenticate(request.app, login, password)
    async with request.app[WRITE_SLOTS]:
        refresh = await refresh_tokens.start_family(
            request.app[DB], account.user_id, request.app[SETTINGS].tokens, account.session_epoch
        )
    log.info("login_succeeded", user_id=account.user_id)
    return _token_pair(request, account.user_id, refresh)


async def _authenticate(app: web.Application, login: str, password: str) -> repository.Credentials:
    """The account ``login`` names if ``password`` is right; else a 401 or 429."""
    throttle, passwords, pool = app[THROTTLE], app[PASSWORDS], app[DB]
    # Looked up first, so that every spelling of one account counts against
    # it. An unknown name costs the same query and the same Redis call.
    folded, found = await repository.find_credentials(pool, login)
    attempt = await _take_throttle_slot(throttle.begin(folded, found.user_id if found else None))
    # An unknown user still costs one argon2 verify (against a dummy hash),
    # so that the answer's timing does not tell whether the account exists.
    verdict = await passwords.verify(found.password_hash if found else None, password)
    if found is None or not verdict.matched:
        log.info("login_failed", known_account=found is not None)
        raise InvalidCredentials()
    await throttle.succeeded(attempt)
    if verdict.as_typed or passwords.needs_rehash(found.password_hash):
        # The password is in hand only now: upgrade a hash made with older,
        # weaker parameters, or of the password before it was normalized.
        new_hash = await passwords.rehash(password, found.password_hash)
        async with app[WRITE_SLOTS]:
            replaced = await repository.set_password_hash(pool, found.user_id, new_hash, replacing=found.password_hash)
        if replaced:
            log.info("password_rehashed", user_id=found.user_id)
    return found


async def _take_throttle_slot(begin: Awaitable[Attempt]) -> Attempt:
    """The slot of a password check, or the 503 or 429 that refuses the check."""
    try:
        attempt = await begin
    except redis.exceptions.RedisError as exc:
        # Without the counter we cannot bound guessing: refuse rather than
        # let passwords be checked unthrottled. Only these: the instance is
        # well, and its callers' breakers must not count this against it.
        log.error("login_throttle_unavailable", error=type(exc).__name__)
        raise FeatureUnavailable("Logins are unavailable for a moment", headers={"Retry-After": "5"}) from None
    if not attempt.allowed:
        raise TooManyRequests(
            "Too many failed logins for this account; try again later",
            headers={"Retry-After": str(attempt.retry_after)},
        )
    return attempt


async def change_password(request: web.Request) -> web.Response:
    """A new password, proven by the current one: every session ends, and this one starts afresh.

    The current password is asked for because an access token alone, left
    in a shared browser or copied, must not be enough to take the account
    over; guesses at it count against the account's login throttle, as a
    login's do. The answer is a new token pair, so that only the device
    that made the change stays signed in.
    """
    app, user_id = request.app, request[PRINCIPAL].user_id
    body = await read_json_object(request)
    found = await repository.credentials_of(app[DB], user_id)
    if found is None:
        raise UserNotFound()
    profile, account = found
    current, new = validation.password_change(body, app[PASSWORDS], username=profile.username, email=profile.email)
    async with app[PASSWORD_SLOTS]:
        # The throttle's slot is taken once a hashing slot is, as a login's
        # is: a change refused TOO_BUSY, its password never checked, must
        # not count as a wrong guess, or retries lock the account's logins.
        attempt = await _take_throttle_slot(app[THROTTLE].begin("", user_id))
        if not (await app[PASSWORDS].verify(account.password_hash, current)).matched:
            log.info("password_change_refused", user_id=user_id)
            raise WrongPassword()
        await app[THROTTLE].succeeded(attempt)
        new_hash = await app[PASSWORDS].hash(new)
    refresh = await _replace_password(app, user_id, current, new_hash, account.password_hash, request[REQUEST_ID])
    log.info("password_changed", user_id=user_id)
    return _token_pair(request, user_id, refresh)


async def _replace_password(
    app: web.Application, user_id: str, current: str, new_hash: str, checked: str, request_id: str
) -> str:
    """Store ``new_hash`` in place of ``checked``, the hash ``current`` was proven against; a new session's token.

    user.password_changed is published with the change, once, and never
    without it, naming the address the account had then: looked up when the
    notice is mailed, it could be one set since by whoever changed the password.

    The hash may have changed since: another change (409), or a login's
    upgrade of the same password to stronger parameters, which ``current``
    still matches, and which must not pass for a change by someone else.
    """
    for _ in range(2):
        async with app[WRITE_SLOTS], publishing(app[DB], app[OUTBOX_COMMITTED]) as cur:
            epoch = await repository.change_password(cur, user_id, new_hash, replacing=checked)
            if epoch is not None:
                # Read after the change's UPDATE, whose lock holds off a change of address.
                user = await repository.fetch_user(cur, user_id)
                assert user is not None  # just updated, in this transaction
                await enqueue(cur, password_changed(user, correlation_id=request_id))
                return await refresh_tokens.issue(cur, user_id, app[SETTINGS].tokens, epoch)
        found = await repository.credentials_of(app[DB], user_id)
        if found is None:
            raise UserNotFound()
        checked = found[1].password_hash
        async with app[PASSWORD_SLOTS]:
            if not (await app[PASSWORDS].verify(checked, current)).matched:
                break
    raise Conflict("The password was changed meanwhile; sign in with the new one")


async def log_out_everywhere(request: web.Request) -> web.Response:
    """End every session of the caller's account, this one's too: no refresh token of theirs works after it.

    Access tokens already issued live on until they expire (ACCESS_TOKEN_TTL):
    they are verified without asking this service.
    """
    user_id = request[PRINCIPAL].user_id
    async with request.app[WRITE_SLOTS]:
        if not await repository.end_sessions(request.app[DB], user_id):
            raise UserNotFound()
    log.info("sessions_ended", user_id=user_id)
    return web.Response(status=204)


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
