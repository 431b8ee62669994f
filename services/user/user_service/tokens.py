"""Access tokens: short-lived EdDSA JWTs, for users and for other services.

What a verifier demands (mesh_common.jwks) is what is issued here: header
``alg`` EdDSA, ``typ`` at+jwt (RFC 9068) and the ``kid`` of the signing key;
claims iss, aud, sub, iat, nbf, exp and a unique jti.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt

from mesh_common.jwks import ACCESS_TOKEN_TYPE, SERVICE_SUBJECT_PREFIX

from .settings import TokenPolicy
from .signing_keys import ALGORITHM, KeyStore

USERS_READ = "users:read"


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    expires_in: int


class TokenIssuer:
    def __init__(self, keys: KeyStore, policy: TokenPolicy) -> None:
        self._keys = keys
        self._policy = policy

    def for_user(self, user_id: str) -> IssuedToken:
        return self._sign(user_id, self._policy.access_ttl)

    def for_service(self, name: str) -> IssuedToken:
        return self._sign(f"{SERVICE_SUBJECT_PREFIX}{name}", self._policy.service_ttl, scope=USERS_READ)

    def _sign(self, subject: str, ttl: int, **extra: Any) -> IssuedToken:
        key = self._keys.active
        now = int(time.time())
        claims = {
            "iss": self._policy.issuer,
            "aud": self._policy.audience,
            "sub": subject,
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "jti": uuid.uuid4().hex,
            **extra,
        }
        headers = {"kid": key.kid, "typ": ACCESS_TOKEN_TYPE}
        return IssuedToken(jwt.encode(claims, key.private_key, algorithm=ALGORITHM, headers=headers), ttl)
