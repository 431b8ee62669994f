"""Local verification of access tokens against the user-service's JWKS.

Every service and the gateway verify tokens themselves, from a cached JWKS:
no call to the user-service per request. The key set is fetched again when
a token names an unknown ``kid`` (a rotation), at most once per cool-down so
that forged ``kid`` values cannot make us hammer the user-service.

What is accepted is fixed here, never read from the token: the algorithm
(EdDSA), the header type (``at+jwt``), the issuer and audience, and the
required claims. Headers that point at other keys (``jku``, ``x5u``, ``jwk``,
``x5c``) or demand extensions (``crit``) are refused outright.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import jwt
import structlog

from .problems import Forbidden, Unauthorized, problem

ALGORITHMS = ["EdDSA"]
ACCESS_TOKEN_TYPE = "at+jwt"
REQUIRED_CLAIMS = ["exp", "nbf", "iat", "iss", "aud", "sub", "jti"]
FORBIDDEN_HEADERS = frozenset({"jku", "x5u", "jwk", "x5c", "x5t", "crit"})
SERVICE_SUBJECT_PREFIX = "service:"
# Seconds of clock difference between the signer and a verifier that exp,
# nbf and iat allow for. The user-service counts it too: a key is retired
# only once the last token it signed is past exp by this much.
LEEWAY = 5
log = structlog.get_logger()

JwksFetcher = Callable[[], Awaitable[dict[str, Any]]]


class InvalidToken(Unauthorized):
    code = "INVALID_TOKEN"
    title = "The access token is invalid"
    default_headers = {"WWW-Authenticate": 'Bearer error="invalid_token"'}  # RFC 6750


# Not a 401: the token may well be valid, and a client that took a 401 for
# "log in again" would log its users out for a server-side outage.
KeysUnavailable = problem(503, "TOKEN_KEYS_UNAVAILABLE", "Access tokens cannot be verified at the moment")


class UnusableKeySet(ValueError):
    """A JWKS that was fetched but holds no key we could verify with."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a user (``sub`` is their id) or another service."""

    subject: str
    token: str
    claims: dict[str, Any]

    @property
    def is_service(self) -> bool:
        return self.subject.startswith(SERVICE_SUBJECT_PREFIX)

    @property
    def user_id(self) -> str:
        if self.is_service:
            # A valid token, of the wrong kind: authenticated, not allowed.
            raise Forbidden("This endpoint is for users")
        return self.subject

    def has_scope(self, scope: str) -> bool:
        return scope in str(self.claims.get("scope", "")).split()


class JwksVerifier:
    """Verifies access tokens against a cached key set.

    A token that verified once is remembered until it expires, because
    signature checks dominate a gateway's CPU otherwise; the memory is
    forgotten whenever the key set changes, a key replaced under its kid
    included.

    Once the key set is half ``max_key_age`` old it is fetched again in the
    background, and requests go on with the keys at hand meanwhile. Only a
    key set past ``max_key_age`` whose latest fetch succeeded (after a quiet
    spell) makes a request wait for the fetch, so a retired key stops
    verifying, cached tokens included, within ``max_key_age`` whenever the
    JWKS can be fetched. While it cannot, the keys at hand are kept; so they
    are when what is fetched holds no key we can use.

    "Signed by an unknown key" (401) needs a key set to say so: with none
    ever fetched, or the latest fetch failed, the answer is a 503.
    """

    def __init__(
        self,
        fetch: JwksFetcher,
        *,
        issuer: str,
        audience: str,
        refresh_cooldown: float = 5.0,
        max_key_age: float = 300.0,
        remember: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._issuer = issuer
        self._audience = audience
        self._cooldown = refresh_cooldown
        self._max_key_age = max_key_age
        self._remember = remember
        self._clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._entries: dict[str, dict[str, Any]] = {}
        self._verified: dict[str, Principal] = {}
        self._fetched_at = float("-inf")
        self._attempted_at = float("-inf")
        self._failing = False  # the latest attempt failed
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None

    async def refresh(self, *, force: bool = False) -> None:
        async with self._lock:
            if not force and self._clock() - self._attempted_at < self._cooldown:
                return
            # The cool-down counts from the attempt, the key set's age from a
            # success: a failed fetch is tried again after the cool-down.
            self._attempted_at = self._clock()
            try:
                document = await self._fetch()
                entries = {
                    entry["kid"]: entry
                    for entry in document.get("keys", [])
                    if entry.get("kid") and entry.get("use", "sig") == "sig" and entry.get("alg") in ALGORITHMS
                }
            except Exception:
                self._failing = True
                raise
            keys = {}
            for kid, entry in entries.items():
                try:
                    keys[kid] = jwt.PyJWK(entry, algorithm=entry["alg"])
                except jwt.PyJWTError:  # one bad key must not take the good ones with it
                    log.warning("jwks_key_skipped", kid=kid)
            if not keys:
                # The user-service always publishes the key that signs: a set
                # without one is not its (a stranger under its name, keys
                # without "alg"), and taken as the truth it would call every
                # token's key unknown, a 401 that logs every user out.
                self._failing = True
                raise UnusableKeySet(f"no usable key among {len(document.get('keys', []))}")
            self._fetched_at = self._clock()
            self._failing = False
            # Whole entries, not only kids: a key replaced under the same kid
            # must not leave tokens it no longer verifies in the memory.
            if entries != self._entries:
                self._verified.clear()
                log.info("jwks_refreshed", kids=sorted(keys))
            self._keys, self._entries = keys, entries

    async def verify(self, token: str) -> Principal:
        if not token.isascii():
            # A JWT is base64url and dots. aiohttp hands header bytes that
            # are not UTF-8 over as lone surrogates, which PyJWT's encode
            # would raise on: a 500, and a caller the rate limiter never counted.
            raise InvalidToken("The token is malformed")
        age = self._clock() - self._fetched_at
        if age > self._max_key_age / 2:
            refreshing = self._refresh_in_background()
            if refreshing is not None and age > self._max_key_age and not self._failing:
                # Shielded, here and below: a caller that gives up must not
                # cancel the fetch that every other request waits for.
                await asyncio.shield(refreshing)
        known = self._verified.get(token)
        if known is not None and known.claims["exp"] > time.time():
            return known
        principal = await self._verify(token)
        if len(self._verified) >= self._remember:
            self._verified.clear()  # crude but bounded; hot tokens come straight back
        self._verified[token] = principal
        return principal

    def _refresh_in_background(self) -> asyncio.Task[None] | None:
        """The fetch in flight, or a new one; None within the cool-down of the last."""
        if self._background is None or self._background.done():
            if self._clock() - self._attempted_at < self._cooldown:
                return None
            # In a context of its own, not the request's that happened to start
            # it: its log lines would carry that request's id, and its work
            # would run under that request's deadline.
            self._background = asyncio.create_task(self._refresh_quietly(), context=contextvars.Context())
        return self._background

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except Exception as exc:  # keep the keys we have; try again after the cool-down
            log.warning("jwks_refresh_failed", error=type(exc).__name__)

    async def close(self) -> None:
        """Stop a background fetch still running (at shutdown)."""
        if self._background is not None:
            self._background.cancel()
            # Waited for, not awaited under suppress(CancelledError), which
            # would swallow a cancellation of the shutdown itself too.
            await asyncio.wait({self._background})

    async def _verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise InvalidToken("The token is malformed") from None
        if FORBIDDEN_HEADERS & header.keys():
            raise InvalidToken("The token header is not acceptable")
        if header.get("alg") not in ALGORITHMS or header.get("typ") != ACCESS_TOKEN_TYPE:
            raise InvalidToken("The token type or algorithm is not acceptable")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise InvalidToken("The token names no key")
        key = self._keys.get(kid)
        if key is None and (refreshing := self._refresh_in_background()) is not None:
            await asyncio.shield(refreshing)
            key = self._keys.get(kid)
        if key is None and (self._failing or self._fetched_at == float("-inf")):
            raise KeysUnavailable(headers={"Retry-After": str(max(1, math.ceil(self._cooldown)))})
        if key is None:
            raise InvalidToken("The token was signed by an unknown key")
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=ALGORITHMS,
                audience=self._audience,
                issuer=self._issuer,
                options={"require": REQUIRED_CLAIMS, "verify_nbf": True},
                leeway=LEEWAY,
            )
        except jwt.InvalidTokenError as exc:
            raise InvalidToken(_reason(exc)) from None
        return Principal(subject=str(claims["sub"]), token=token, claims=claims)


def _reason(exc: jwt.InvalidTokenError) -> str:
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "The token has expired"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "The token is not valid yet"
    if isinstance(exc, jwt.InvalidAudienceError | jwt.InvalidIssuerError):
        return "The token is not meant for this API"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return "The token lacks a required claim"
    return "The token signature or format is invalid"
