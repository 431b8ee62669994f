"""Typed app state of the user-service."""

from __future__ import annotations

from aiohttp import web

from .passwords import Passwords
from .settings import Settings
from .signing_keys import KeyStore
from .throttle import LoginThrottle
from .tokens import TokenIssuer

SETTINGS = web.AppKey("user.settings", Settings)
PASSWORDS = web.AppKey("user.passwords", Passwords)
KEY_STORE = web.AppKey("user.key_store", KeyStore)
TOKENS = web.AppKey("user.tokens", TokenIssuer)
THROTTLE = web.AppKey("user.login_throttle", LoginThrottle)
