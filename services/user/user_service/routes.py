"""URL map. Routes are named: the auth middleware's public list uses the names."""

from __future__ import annotations

from aiohttp import web

from . import auth_handlers, handlers, verification_handlers
from .openapi import get_openapi

# Everything else requires an access token.
PUBLIC_ROUTES = frozenset(
    {
        ("POST", "users.create"),
        ("POST", "auth.login"),
        ("POST", "auth.refresh"),
        ("POST", "auth.logout"),
        # The code is the proof: whoever holds it read the mailbox.
        ("POST", "auth.verify_email"),
        ("POST", "auth.service_token"),
        ("GET", "jwks"),
    }
)


def setup_routes(app: web.Application) -> None:
    router = app.router
    router.add_post("/users", handlers.register_user, name="users.create")
    # /users/me before /users/{id}, which would otherwise take "me" for an id.
    router.add_get("/users/me", handlers.get_my_profile, name="users.me")
    router.add_patch("/users/me", handlers.update_my_profile, name="users.update_me")
    router.add_post("/users/me/password", auth_handlers.change_password, name="users.password")
    router.add_delete("/users/me/sessions", auth_handlers.log_out_everywhere, name="users.sessions")
    router.add_post(
        "/users/me/email/verification", verification_handlers.request_verification, name="users.email_verification"
    )
    router.add_get("/users/{id}", handlers.get_user, name="users.get")
    router.add_post("/auth/login", auth_handlers.log_in, name="auth.login")
    router.add_post("/auth/refresh", auth_handlers.refresh_session, name="auth.refresh")
    router.add_post("/auth/logout", auth_handlers.log_out, name="auth.logout")
    router.add_post("/auth/verify-email", verification_handlers.verify_email, name="auth.verify_email")
    router.add_post("/auth/service-token", auth_handlers.issue_service_token, name="auth.service_token")
    router.add_get("/.well-known/jwks.json", auth_handlers.get_jwks, name="jwks")
    router.add_get("/openapi.json", get_openapi, name="openapi")
