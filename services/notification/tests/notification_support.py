"""Test doubles and helpers for the notification-service suite.

- ``private_definitions``: this service's part of rabbitmq/definitions.json,
  renamed with a prefix, so each test run has its own exchange, queues and
  policies on the shared broker (a whole-stack run may be consuming the real
  ``notifications.events`` at the same time).
- ``FakeUserService``: an aiohttp app answering ``POST /auth/service-token``
  and ``GET /users/{id}`` (``email_verified: true`` unless told otherwise),
  registered in the real Consul under a unique name, and able to go down and come back on the same port (held, refusing
  connections, while it is down: see ``HeldPort.hold_again``).

The SMTP sink is in ``smtp_sink``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, overload
from urllib.parse import quote

import aio_pika
import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient

from devstack import rabbitmq
from devstack.config import StackConfig
from mesh_common.events import Event
from mesh_common.testing import HeldPort
from notification_service.topology import Topology

DEFINITIONS = Path(__file__).resolve().parents[3] / "rabbitmq" / "definitions.json"
SECRET = "notification-test-secret-0123456789"
MAIL_FROM = "todo-mesh <no-reply@todo-mesh.test>"
T = TypeVar("T")
Client = TestClient[web.Request, web.Application]
StartService = Callable[..., Awaitable[Client]]


# What comes back is truthy, so never None: a check that may give None gives its other type.
@overload
async def eventually(
    check: Callable[[], Awaitable[T | None]], *, within: float, what: str, interval: float = ...
) -> T: ...
@overload
async def eventually(check: Callable[[], T | None], *, within: float, what: str, interval: float = ...) -> T: ...
async def eventually(check: Callable[[], object], *, within: float, what: str, interval: float = 0.05) -> object:
    """Poll ``check`` (sync or async) until it returns something truthy, for at most ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}; last: {result!r}")
        await asyncio.sleep(interval)


# -- broker ----------------------------------------------------------------------
def private_definitions(prefix: str) -> tuple[dict[str, Any], Topology]:
    """Our exchanges, queues, bindings and policies from definitions.json, renamed with ``prefix``."""
    full = json.loads(DEFINITIONS.read_text())
    ours = {key: full[key] for key in ("exchanges", "queues", "bindings", "policies")}
    # Names have no regex metacharacters but dots, and a prefix without dots
    # keeps the policies' patterns matching exactly the renamed queues.
    text = json.dumps(ours).replace("notifications", f"{prefix}_notifications")
    # todo-mesh.events, its alternate exchange and queue (todo-mesh.unrouted),
    # and the policy's pattern, where the dot is escaped (a JSON-escaped
    # backslash in this text).
    text = text.replace("todo-mesh.", f"{prefix}_todo-mesh.").replace("todo-mesh\\\\.", f"{prefix}_todo-mesh\\\\.")
    return json.loads(text), Topology(exchange=f"{prefix}_todo-mesh.events", namespace=f"{prefix}_notifications")


class Management:
    """The broker's management API (synchronous: used from session fixtures)."""

    def __init__(self, infra: StackConfig) -> None:
        self._infra = infra

    def request(self, method: str, path: str, body: Any = None) -> Any:
        return rabbitmq.management(self._infra, method, path, body)

    def import_definitions(self, definitions: dict[str, Any]) -> None:
        self.request("POST", "/definitions", definitions)

    def delete_definitions(self, definitions: dict[str, Any]) -> None:
        for q in definitions["queues"]:
            self.delete(f"/queues/%2F/{q['name']}")
        for x in definitions["exchanges"]:
            self.delete(f"/exchanges/%2F/{x['name']}")
        for p in definitions["policies"]:
            self.delete(f"/policies/%2F/{p['name']}")

    def delete(self, path: str) -> None:
        """Delete what ``path`` names; gone already (a test deleted it) is fine."""
        import urllib.error

        try:
            self.request("DELETE", path)
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise

    def queue(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"/queues/%2F/{name}")


async def amqp_connection(management: Management, name: str) -> str:
    """The broker's name for the AMQP connection whose client named it ``name``.

    The management API lists a connection only at its next statistics round
    (a few seconds): looked up ahead of the moment a test drops it.
    """

    async def named() -> str | None:
        connections: list[dict[str, Any]] = await asyncio.to_thread(management.request, "GET", "/connections")
        for c in connections:
            if (c.get("client_properties") or {}).get("connection_name") == name:
                return str(c["name"])
        return None

    return await eventually(named, within=15, what=f"the AMQP connection {name}")


async def drop_amqp_connection(management: Management, connection: str) -> None:
    """Close ``connection`` (the broker's name for it) from the broker's side: what a broker restart looks like."""
    await asyncio.to_thread(management.request, "DELETE", f"/connections/{quote(connection, safe='')}")


@dataclass
class Broker:
    """A test's view of our private topology: publish events, count what waits."""

    channel: aio_pika.abc.AbstractChannel
    exchange: aio_pika.abc.AbstractExchange
    topology: Topology

    async def publish(self, event: Event, *, body: bytes | None = None) -> None:
        await publish(self.exchange, event, body=body)

    async def ready(self, queue: str) -> int:
        declared = await self.channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0


async def publish(
    exchange: aio_pika.abc.AbstractExchange, event: Event, *, body: bytes | None = None, routing_key: str | None = None
) -> None:
    """Publish ``event`` the way the outbox relay does (``routing_key``: its type, unless given)."""
    await exchange.publish(
        aio_pika.Message(
            body if body is not None else event.to_json(),
            message_id=event.id,
            correlation_id=event.correlation_id,
            type=event.type,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            timestamp=datetime.now(UTC),
        ),
        routing_key=routing_key or event.type,
    )


def verification_requested(
    user: dict[str, str], *, token: str | None = None, expires_in: float = 86400.0, reason: str = "registered"
) -> Event:
    """A ``user.email_verification_requested`` event for ``user``'s address, as the user-service writes it."""
    return Event(
        type="user.email_verification_requested",
        user_id=user["id"],
        data={
            "user_id": user["id"],
            "username": user["username"],
            "display_name": user["display_name"],
            "email": user["email"],
            "token": token or secrets.token_urlsafe(32),
            "expires_at": (datetime.now(UTC) + timedelta(seconds=expires_in)).isoformat(),
            "reason": reason,
        },
        correlation_id=uuid.uuid4().hex,
    )


def registered(user: dict[str, str]) -> Event:
    return Event(
        type="user.registered",
        user_id=user["id"],
        data={
            "user_id": user["id"],
            "username": user["username"],
            "email": user["email"],
            "display_name": user["display_name"],
        },
        correlation_id=uuid.uuid4().hex,
    )


def security_notice(
    event_type: str, user: dict[str, str], *, verified: bool = True, last_verified: str | None = None
) -> Event:
    """A ``user.password_changed`` or ``user.email_changed`` for ``user``, as the user-service writes it.

    ``user``'s address is the one the account had at the change, ``verified``
    or not; ``last_verified``, the last address it proved before, if any.
    """
    data: dict[str, Any] = {
        "user_id": user["id"],
        "username": user["username"],
        "display_name": user["display_name"],
        "email": user["email"],
        "email_verified": verified,
    }
    if last_verified is not None:
        data["last_verified_email"] = last_verified
    return Event(type=event_type, user_id=user["id"], data=data, correlation_id=uuid.uuid4().hex)


def todo_event(kind: str, user_id: str, todo: dict[str, Any], **envelope: Any) -> Event:
    """A todo event; its snapshot is at version 1 unless it says otherwise."""
    data = {"version": 1, **todo}
    return Event(type=f"todo.{kind}", user_id=user_id, data=data, correlation_id=uuid.uuid4().hex, **envelope)


def new_user(tag: str = "") -> dict[str, str]:
    name = f"u{uuid.uuid4().hex[:10]}{tag}"
    return {"id": str(uuid.uuid4()), "username": name, "email": f"{name}@example.test", "display_name": name.title()}


# -- user-service --------------------------------------------------------------------
class FakeUserService:
    def __init__(self, consul_url: str, name: str, *, secret: str = SECRET, token_ttl: int = 300) -> None:
        self.name = name
        self._held = HeldPort()
        self.port = self._held.port
        self.users: dict[str, dict[str, str]] = {}
        self.verified: dict[str, bool | None] = {}  # user id -> their profile's email_verified (None: not in it)
        self.token_requests = 0
        self.user_requests = 0
        self.answer_empty = False  # a 200 without a body, as from a broken proxy in between
        # The body of a 404 not about the user (a proxy's page, a path an instance lacks), if set.
        self.other_404: str | None = None
        self._consul_url = consul_url
        self.secret = secret
        self._token_ttl = token_ttl
        self._tokens: set[str] = set()
        self._runner: web.AppRunner | None = None
        self._site: web.SockSite | None = None

    def add(self, user: dict[str, str], *, verified: bool | None = True) -> dict[str, str]:
        """Know ``user``; their profile's ``email_verified`` is ``verified``, or missing if that is None."""
        self.users[user["id"]] = user
        self.verified[user["id"]] = verified
        return user

    def revoke_tokens(self) -> None:
        self._tokens.clear()

    async def issue_token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        body = await request.json()
        if body != {"client_id": "notification-service", "client_secret": self.secret}:
            return web.json_response({"code": "INVALID_CLIENT"}, status=401)
        token = uuid.uuid4().hex
        self._tokens.add(token)
        return web.json_response({"access_token": token, "token_type": "Bearer", "expires_in": self._token_ttl})

    async def get_user(self, request: web.Request) -> web.Response:
        self.user_requests += 1
        if request.headers.get("Authorization", "").removeprefix("Bearer ") not in self._tokens:
            return web.json_response({"code": "INVALID_TOKEN"}, status=401)
        if self.answer_empty:
            return web.Response(status=200)
        if self.other_404 is not None:
            json_body = self.other_404.startswith("{")
            return web.Response(
                status=404, text=self.other_404, content_type="application/json" if json_body else "text/plain"
            )
        user = self.users.get(request.match_info["id"])
        if user is None:
            return web.json_response({"code": "USER_NOT_FOUND"}, status=404)
        verified = self.verified.get(user["id"], True)
        return web.json_response(user if verified is None else {**user, "email_verified": verified})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/auth/service-token", self.issue_token)
        app.router.add_get("/users/{id}", self.get_user)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self._site = web.SockSite(self._runner, self._held.take())
        await self._site.start()

    async def stop(self) -> None:
        """Go down: the port stays bound, not listening, until ``start``, so a connection to it is refused."""
        if self._site is not None:
            await self._site.stop()  # closes the listening socket before it returns
            self._site = None
        # At once, after the listening socket closed; one never started holds it still.
        self._held.hold_again()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def close(self) -> None:
        """``stop``, and let go of the port: the fake's end, whether it ever started or not."""
        try:
            await self.stop()
        finally:
            self._held.close()

    async def register(self) -> None:
        # No health check: Consul keeps the instance listed while it is
        # down, so the outage is met by breakers, as a crash would be.
        async with aiohttp.ClientSession() as session:
            body = {"Name": self.name, "ID": f"{self.name}-1", "Address": "127.0.0.1", "Port": self.port}
            async with session.put(f"{self._consul_url}/v1/agent/service/register", json=body) as resp:
                assert resp.status == 200, await resp.text()

    async def deregister(self) -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.put(f"{self._consul_url}/v1/agent/service/deregister/{self.name}-1") as resp,
        ):
            # Without a check, a failed deregistration would stay in Consul for good.
            assert resp.status == 200, await resp.text()
