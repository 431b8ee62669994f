"""The public API surface: which prefix goes to which service.

The gateway strips ``/api/v1`` and forwards the rest, so services own plain
paths (``/todos``) and never see how they are published. Routes not listed
as public need a valid access token.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Route:
    prefix: str
    service: str
    strip: str = "/api/v1"
    timeout: float = 5.0

    def upstream_path(self, path: str) -> str:
        return path[len(self.strip) :] if self.strip and path.startswith(self.strip) else path


ROUTES: tuple[Route, ...] = (
    Route("/api/v1/auth/", "user-service"),
    Route("/api/v1/users", "user-service"),
    Route("/.well-known/jwks.json", "user-service", strip=""),
    Route("/api/v1/todos", "todo-service"),
    Route("/api/v1/notifications", "notification-service"),
)

# (method, path) pairs reachable without a token. Everything else needs one.
PUBLIC: frozenset[tuple[str, str]] = frozenset(
    {
        ("POST", "/api/v1/users"),
        ("POST", "/api/v1/auth/login"),
        ("POST", "/api/v1/auth/refresh"),
        ("GET", "/.well-known/jwks.json"),
    }
)


def match(path: str) -> Route | None:
    for route in ROUTES:
        if path == route.prefix.rstrip("/") or path.startswith(route.prefix):
            return route
    return None


def upstream_services() -> tuple[str, ...]:
    return tuple(dict.fromkeys(r.service for r in ROUTES))
