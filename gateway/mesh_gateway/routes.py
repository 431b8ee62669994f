"""The public API surface: which prefix goes to which service.

The gateway strips ``/api/v1`` and forwards the rest, so services own plain
paths (``/todos``) and never see how they are published. Paths not listed
as public need a valid access token.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True, slots=True)
class Route:
    prefix: str
    service: str
    strip: str = "/api/v1"
    timeout: float = 5.0
    # The paths, as published, where the service deduplicates POSTs by their
    # Idempotency-Key: there, and only there, the gateway may retry them.
    idempotency_key_paths: frozenset[str] = frozenset()
    _base: str = field(init=False, repr=False, compare=False)
    # What is stripped: ``strip`` where the prefix is under it, else nothing
    # (an extra route such as ``/echo`` goes on as it came).
    _strip: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        base = self.prefix.rstrip("/")
        object.__setattr__(self, "_base", base)
        under = bool(self.strip) and (base == self.strip or base.startswith(self.strip + "/"))
        object.__setattr__(self, "_strip", self.strip if under else "")

    def upstream_path(self, raw_path: str) -> str | None:
        """The path to forward, still encoded; None if the prefix to strip is not spelled out as sent.

        Routes are matched on the decoded path, so ``/api/v1%2Ftodos``
        matches ``/api/v1/todos``; stripped as sent it would leave
        ``%2Ftodos``, a target no server accepts. Such a path is not one the
        API publishes, and the gateway answers 404 itself.
        """
        strip = self._strip
        if not strip:
            return raw_path
        if raw_path == strip:
            return "/"
        if raw_path.startswith(strip) and raw_path[len(strip)] == "/":
            return raw_path[len(strip) :]
        return None

    def matches(self, path: str) -> bool:
        base = self._base
        return path.startswith(base) and (len(path) == len(base) or path[len(base)] == "/")


@dataclass(frozen=True, slots=True)
class RouteTable:
    routes: tuple[Route, ...]
    # (method, path) pairs reachable without a token. Everything else needs one.
    public: frozenset[tuple[str, str]]
    # Where credentials are guessed or accounts mass-created: a tighter per-IP limit.
    auth: frozenset[tuple[str, str]]
    # Paths (and what is under them) that services keep for one another:
    # never published, whatever prefix would otherwise carry them.
    internal: tuple[str, ...] = ()
    # Writes that keep a session going, proven by a refresh token nobody can
    # guess: they pass, like reads, while the rate limiter's Redis is away.
    # Refused, every signed-in user would be signed out within an access
    # token's lifetime (10 minutes), and a cache outage would become a full one.
    # Only the service can check that proof, though, so they pass within a
    # share of the IP's limit, kept by each gateway (outage.session_allowance).
    session: frozenset[tuple[str, str]] = frozenset()
    # The paths of ``public``: reached under another method, the service
    # answers (a 405 with Allow, or its own 401), not the gateway's 401.
    public_paths: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "public_paths", frozenset(path for _, path in self.public))

    def match(self, path: str) -> Route | None:
        for internal in self.internal:
            if path == internal or path.startswith(internal + "/"):
                return None
        for route in self.routes:
            if route.matches(path):
                return route
        return None

    def services(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r.service for r in self.routes))

    def extended(self, extra: tuple[tuple[str, str], ...]) -> RouteTable:
        routes = tuple(Route(prefix, service) for prefix, service in extra)
        return replace(self, routes=self.routes + routes)


API = RouteTable(
    routes=(
        Route("/api/v1/auth", "user-service"),
        Route("/api/v1/users", "user-service"),
        Route("/.well-known/jwks.json", "user-service", strip=""),
        # Creating a todo, not completing or reopening one.
        Route("/api/v1/todos", "todo-service", idempotency_key_paths=frozenset({"/api/v1/todos"})),
        Route("/api/v1/notifications", "notification-service"),
    ),
    public=frozenset(
        {
            ("POST", "/api/v1/users"),
            ("POST", "/api/v1/auth/login"),
            ("POST", "/api/v1/auth/refresh"),
            # Like refresh, proven by the refresh token in its body: a user
            # whose access token has run out must still be able to end the session.
            ("POST", "/api/v1/auth/logout"),
            # The code from the confirmation email is the proof: whoever
            # reads it may not be signed in on that device.
            ("POST", "/api/v1/auth/verify-email"),
            ("GET", "/.well-known/jwks.json"),
        }
    ),
    # The tighter limits: whatever hashes a password, and whatever tells
    # whether an email is taken (a profile's new email answers 409 if it is).
    auth=frozenset(
        {
            ("POST", "/api/v1/users"),
            ("POST", "/api/v1/auth/login"),
            ("PATCH", "/api/v1/users/me"),
            ("POST", "/api/v1/users/me/password"),
        }
    ),
    # Services trade their client secret for a service token here; from
    # outside it would only be a place to guess secrets.
    internal=("/api/v1/auth/service-token",),
    session=frozenset({("POST", "/api/v1/auth/refresh"), ("POST", "/api/v1/auth/logout")}),
)
