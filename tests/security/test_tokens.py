"""Forged, stale and misdirected access tokens, against a live user-service.

Every token below is presented to ``GET /users/me``; every one must get a 401.
Most are built by hand, because PyJWT rightly refuses to make some of them.
Two controls keep the suite honest: a correctly made token is accepted, and
so is one from the key that is later retired, before its retirement.

Run with ``-s`` to see the table; the last line reads ``accepted: 0 of N``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mesh_common.auth import VERIFIER
from mesh_common.db import DB
from user_service.keys import KEY_STORE
from user_service.signing_keys import retire_keys, rotate_keys

ISSUER, AUDIENCE = "todo-mesh", "todo-mesh-api"
PASSWORD = "a long and unusual passphrase"
Signer = Callable[[bytes], bytes]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def compact(header: dict[str, Any], claims: dict[str, Any], sign: Signer) -> str:
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64url(sign(signing_input.encode()))}"


def claims_for(subject: str, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": subject,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
        **changes,
    }
    return {name: value for name, value in claims.items() if value is not None}


def eddsa(key: Ed25519PrivateKey, kid: str, **header: Any) -> dict[str, Any]:
    return {name: value for name, value in {"alg": "EdDSA", "typ": "at+jwt", "kid": kid, **header}.items() if value}


def public_jwk(key: Ed25519PrivateKey, kid: str) -> dict[str, Any]:
    return {**jwt.algorithms.OKPAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid}


def hs256(secret: bytes) -> Signer:
    return lambda data: hmac.new(secret, data, hashlib.sha256).digest()


async def status_of(client: Any, token: str) -> int:
    response = await client.get("/users/me", headers={"Authorization": f"Bearer {token}"})
    return int(response.status)


async def test_no_forged_or_stale_token_is_accepted(user_service: Any, aiohttp_server: Any) -> None:
    client = user_service
    app = client.app
    body = {"username": "ada", "email": "ada@example.com", "password": PASSWORD}
    user = await (await client.post("/users", json=body)).json()
    session = await (await client.post("/auth/login", json={"username": "ada", "password": PASSWORD})).json()
    sub = user["id"]

    # The attacker's own key, published from a server the attacker controls.
    attacker, attacker_kid = Ed25519PrivateKey.generate(), "attacker"
    fetched: list[str] = []

    async def attacker_jwks(request: web.Request) -> web.Response:
        fetched.append(request.path)
        return web.json_response({"keys": [public_jwk(attacker, attacker_kid)]})

    attacker_app = web.Application()
    attacker_app.router.add_get("/{tail:.*}", attacker_jwks)
    attacker_url = str((await aiohttp_server(attacker_app)).make_url("/jwks.json"))

    # The key about to be retired: its tokens verify until it is retired.
    old = app[KEY_STORE].active
    old_token = compact(eddsa(old.private_key, old.kid), claims_for(sub), old.private_key.sign)
    assert await status_of(client, old_token) == 200, "control: a token from the retiring key must verify"
    await rotate_keys(app[DB], force=True)
    await retire_keys(app[DB], force=True)
    await app[VERIFIER].refresh(force=True)

    key = app[KEY_STORE].active
    real, kid = key.private_key, key.kid
    public = real.public_key()
    public_raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    public_pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    good_token = compact(eddsa(real, kid), claims_for(sub), real.sign)
    assert await status_of(client, good_token) == 200, "control: a correctly made token must verify"
    tampered = good_token[:-4] + ("AAAA" if not good_token.endswith("AAAA") else "BBBB")

    cases: dict[str, str] = {
        "alg none": compact({"alg": "none", "typ": "at+jwt", "kid": kid}, claims_for(sub), lambda _: b""),
        "alg None, no signature part": compact(
            {"alg": "None", "typ": "at+jwt", "kid": kid}, claims_for(sub), lambda _: b""
        )[:-1],
        "HS256 keyed with the raw public key": compact(
            {"alg": "HS256", "typ": "at+jwt", "kid": kid}, claims_for(sub), hs256(public_raw)
        ),
        "HS256 keyed with the public key PEM": compact(
            {"alg": "HS256", "typ": "at+jwt", "kid": kid}, claims_for(sub), hs256(public_pem)
        ),
        "HS256 keyed with the JWK x value": compact(
            {"alg": "HS256", "typ": "at+jwt", "kid": kid}, claims_for(sub), hs256(public_jwk(real, kid)["x"].encode())
        ),
        "bad signature": tampered,
        "signed by another key under the real kid": compact(eddsa(attacker, kid), claims_for(sub), attacker.sign),
        "expired": compact(eddsa(real, kid), claims_for(sub, exp=int(time.time()) - 60), real.sign),
        "not valid yet (future nbf)": compact(eddsa(real, kid), claims_for(sub, nbf=int(time.time()) + 120), real.sign),
        "missing exp": compact(eddsa(real, kid), claims_for(sub, exp=None), real.sign),
        "missing nbf": compact(eddsa(real, kid), claims_for(sub, nbf=None), real.sign),
        "missing sub": compact(eddsa(real, kid), claims_for(sub, sub=None), real.sign),
        "wrong audience": compact(eddsa(real, kid), claims_for(sub, aud="someone-else"), real.sign),
        "wrong issuer": compact(eddsa(real, kid), claims_for(sub, iss="https://evil.example"), real.sign),
        "unknown kid": compact(eddsa(attacker, attacker_kid), claims_for(sub), attacker.sign),
        "missing kid": compact(eddsa(real, ""), claims_for(sub), real.sign),
        "jku pointing at the attacker's keys": compact(
            eddsa(attacker, attacker_kid, jku=attacker_url), claims_for(sub), attacker.sign
        ),
        "x5u pointing at the attacker's keys": compact(
            eddsa(attacker, attacker_kid, x5u=attacker_url), claims_for(sub), attacker.sign
        ),
        "jwk header with the attacker's key": compact(
            eddsa(attacker, attacker_kid, jwk=public_jwk(attacker, attacker_kid)), claims_for(sub), attacker.sign
        ),
        "jwk header with the attacker's key under the real kid": compact(
            eddsa(attacker, kid, jwk=public_jwk(attacker, kid)), claims_for(sub), attacker.sign
        ),
        "x5c header": compact(eddsa(real, kid, x5c=[b64url(public_pem)]), claims_for(sub), real.sign),
        "crit header": compact(eddsa(real, kid, crit=["exp"]), claims_for(sub), real.sign),
        "missing typ": compact(eddsa(real, kid, typ=None), claims_for(sub), real.sign),
        "typ JWT instead of at+jwt": compact(eddsa(real, kid, typ="JWT"), claims_for(sub), real.sign),
        # Refresh tokens here are opaque, not JWTs, so this one fails as "not
        # a JWT"; a signed token of another kind is what the typ cases cover.
        "refresh token used as access token": session["refresh_token"],
        "signed by a retired key": compact(eddsa(old.private_key, old.kid), claims_for(sub), old.private_key.sign),
        "not a JWT at all": "not-a-token",
    }

    results = {name: await status_of(client, token) for name, token in cases.items()}
    accepted = [name for name, status in results.items() if status != 401]
    width = max(map(len, results))
    for name, status in results.items():
        print(f"{name:<{width}}  {status}")
    print(f"accepted: {len(accepted)} of {len(results)}")

    assert accepted == []
    assert fetched == [], "a token header made us fetch keys from the attacker"
