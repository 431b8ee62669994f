"""Whose todo it is: the owner's display name, from the user-service.

The name is a courtesy, never a reason to fail. The call goes through the
shared ``ServiceClient`` (a healthy instance from Consul, one breaker per
instance, a retry only if safe, a deadline), and when it cannot answer, the
todos are served anyway with ``display_name: null`` and the response says
so in ``X-Degraded: owner``. With the breaker open the lookup fails at once,
so a user-service outage costs the caller nothing but the name.

A request's todos all belong to the caller, so a request makes one call,
whatever the number of todos it shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from mesh_common.http import ServiceClient

DEGRADED_HEADER = "X-Degraded"
log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class Owner:
    id: str
    display_name: str | None
    degraded: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "display_name": self.display_name}


class OwnerLookup(Protocol):
    async def lookup(self, user_id: str, *, token: str, request_id: str, until: float | None = None) -> Owner: ...


class OwnerDirectory:
    def __init__(self, client: ServiceClient, service: str) -> None:
        self._client = client
        self._service = service

    async def lookup(self, user_id: str, *, token: str, request_id: str, until: float | None = None) -> Owner:
        # The caller's own token: the user-service decides what they may see.
        headers = {"Authorization": f"Bearer {token}", "X-Request-ID": request_id}
        try:
            profile = await self._client.get_json(self._service, f"/users/{user_id}", headers=headers, until=until)
        except Exception as exc:  # any failure (no instance, open breaker, 5xx, timeout, 4xx, bad JSON) degrades
            log.warning("owner_lookup_degraded", service=self._service, error=type(exc).__name__)
            return Owner(user_id, None, degraded=True)
        name = profile.get("display_name") if isinstance(profile, dict) else None
        return Owner(user_id, name if isinstance(name, str) else None)
