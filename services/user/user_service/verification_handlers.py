"""Email verification: prove an address by sending back the code mailed to it, or ask for another.

Design notes: docs/services/user.md. The code never reaches a log line:
what is logged is whose it was and what came of it.
"""

from __future__ import annotations

from typing import Any

import structlog
from aiohttp import web

from mesh_common.auth import PRINCIPAL
from mesh_common.db import DB
from mesh_common.outbox import OUTBOX_COMMITTED, enqueue, publishing
from mesh_common.problems import read_json_object
from mesh_common.requests import REQUEST_ID
from mesh_common.transactions import transaction

from . import repository, validation, verification
from .errors import EmailAlreadyVerified, InvalidVerificationToken, UserNotFound, VerificationRecentlySent
from .events import Reason, email_verification_requested
from .keys import WRITE_SLOTS
from .repository import User

log = structlog.get_logger()


async def send_code(cur: Any, user: User, reason: Reason, *, correlation_id: str) -> verification.Issued:
    """Issue a code for the user's current address and enqueue the mail of it, in the transaction ``cur`` is in."""
    issued = await verification.issue(cur, user.id, user.email, requested=reason == "requested")
    # Not kept once published: the event holds the code itself (outbox.py).
    await enqueue(cur, email_verification_requested(user, issued, reason, correlation_id=correlation_id), keep=False)
    log.info("email_verification_issued", user_id=user.id, reason=reason)
    return issued


async def verify_email(request: web.Request) -> web.Response:
    """Public: the code is the proof, and whoever holds it read the mailbox."""
    token = validation.verification_token(await read_json_object(request))
    async with request.app[WRITE_SLOTS], transaction(request.app[DB]) as cur:
        user_id = await verification.spend(cur, token)
    # Refused after the commit: a code that proved nothing is gone all the same.
    if user_id is None:
        log.info("email_verification_rejected")
        raise InvalidVerificationToken()
    log.info("email_verified", user_id=user_id)
    return web.Response(status=204)


async def request_verification(request: web.Request) -> web.Response:
    user_id = request[PRINCIPAL].user_id
    async with request.app[WRITE_SLOTS], publishing(request.app[DB], request.app[OUTBOX_COMMITTED]) as cur:
        # Locked: two requests at once would otherwise both find no recent code.
        user = await repository.fetch_user(cur, user_id, for_update=True)
        if user is None:  # a valid token for an account that is gone
            raise UserNotFound()
        if user.email_verified:
            raise EmailAlreadyVerified()
        wait = await verification.resend_wait(cur, user_id)
        if wait:
            raise VerificationRecentlySent(
                f"At most one code a minute and {verification.RESENDS_PER_HOUR} an hour; the codes sent"
                " already stay good. See Retry-After",
                headers={"Retry-After": str(wait)},
            )
        issued = await send_code(cur, user, "requested", correlation_id=request[REQUEST_ID])
    return web.json_response({"email": issued.email, "expires_at": issued.expires_at_iso()}, status=202)
