"""Typed app state of the user-service."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from aiohttp import web

from .passwords import HashingSlots, Passwords
from .settings import Settings
from .signing_keys import KeyStore
from .throttle import LoginThrottle
from .tokens import TokenIssuer

SETTINGS = web.AppKey("user.settings", Settings)
REDIS = web.AppKey("user.redis", aioredis.Redis)
PASSWORDS = web.AppKey("user.passwords", Passwords)
KEY_STORE = web.AppKey("user.key_store", KeyStore)
TOKENS = web.AppKey("user.tokens", TokenIssuer)
THROTTLE = web.AppKey("user.login_throttle", LoginThrottle)
# Bulkheads (see app.py): logins and registrations in progress at once,
# and database connections that writes may hold at once.
PASSWORD_SLOTS = web.AppKey("user.password_slots", HashingSlots)
WRITE_SLOTS = web.AppKey("user.write_slots", asyncio.Semaphore)
