"""How a session is opened: TLS (implicit or STARTTLS, the server always verified) and SMTP AUTH.

aiosmtplib does both inside ``connect``: the TLS handshake or STARTTLS,
then AUTH, once per session. A reused session is already logged in.

The TLS context is built once, from ``SMTP_CA_FILE`` (checked at start) or
the system's CAs, and shared by every session: loading a bundle for each
connection would cost a file read and a parse in a thread every time.
Verification is never turned off, and STARTTLS is required, not attempted:
a server that does not offer it (or an attacker who strips it from the
EHLO answer) gets no message and no password.
"""

from __future__ import annotations

import ssl
from typing import Any

import structlog

from .settings import SmtpSettings, is_loopback

log = structlog.get_logger()


def tls_context(settings: SmtpSettings) -> ssl.SSLContext | None:
    """The context the server is verified with; None without TLS.

    With ``ca_file`` the bundle is all that is trusted (a private CA), not
    added to the system's CAs. Certificate and host name are checked either way.
    """
    if settings.tls == "none":
        return None
    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.ca_file)


def client_options(settings: SmtpSettings) -> dict[str, Any]:
    """aiosmtplib's ``SMTP`` keyword arguments for a new session: where, how protected, and the login."""
    if settings.password is not None and settings.tls == "none" and not is_loopback(settings.host):
        # Allowed only with SMTP_AUTH_INSECURE=true (settings.py): said once, at start, not hidden.
        log.warning("smtp_password_sent_in_clear", host=settings.host, port=settings.port)
    return {
        "hostname": settings.host,
        "port": settings.port,
        "timeout": settings.timeout,
        "use_tls": settings.tls == "implicit",
        # False, not aiosmtplib's default None, which would try STARTTLS when
        # offered and go on without it when not.
        "start_tls": settings.tls == "starttls",
        "tls_context": tls_context(settings),
        "username": settings.username,
        "password": settings.password,
    }
