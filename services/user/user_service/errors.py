"""The problems this service answers with, beyond mesh_common's generic ones.

Several are deliberately vague: saying *which* of username and email is
taken, or *whether* an account exists, would let anyone list the accounts.
"""

from __future__ import annotations

from mesh_common.problems import LOAD_SHED, problem

AccountExists = problem(409, "ACCOUNT_EXISTS", "An account with this username or email already exists")
InvalidCredentials = problem(401, "INVALID_CREDENTIALS", "The username or password is incorrect")
InvalidRefreshToken = problem(401, "INVALID_REFRESH_TOKEN", "The refresh token is invalid or expired")
# Not a 401: the access token is good, and a client would take a 401 for its expiry.
WrongPassword = problem(403, "INVALID_CURRENT_PASSWORD", "The current password is incorrect")
InvalidClient = problem(401, "INVALID_CLIENT", "The client credentials are invalid")
UserNotFound = problem(404, "USER_NOT_FOUND", "No such user")
# Not a 429: nobody in particular is over a limit; the service is, for now.
# LOAD_SHED: the callers' breakers do not count it against this instance.
HashingBusy = problem(503, LOAD_SHED, "Too many sign-ins at once; try again in a moment")
# One body for a code that is unknown, expired, spent, or for an address the
# account no longer has: which one it was goes to nobody.
InvalidVerificationToken = problem(
    400, "INVALID_VERIFICATION_TOKEN", "The verification code is invalid, expired or already used"
)
EmailAlreadyVerified = problem(409, "EMAIL_ALREADY_VERIFIED", "The email address is verified already")
VerificationRecentlySent = problem(
    429, "VERIFICATION_RECENTLY_SENT", "A verification code was sent a moment ago; see Retry-After"
)
