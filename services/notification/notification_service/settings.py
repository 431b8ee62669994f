"""notification-service settings, read from the environment by ``__main__`` only."""

from __future__ import annotations

import email.errors
import email.policy
import ipaddress
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from email.headerregistry import AddressHeader
from email.utils import getaddresses
from typing import Literal, cast

from aiosmtplib.email import parse_address

from mesh_common.events import EVENTS_EXCHANGE
from mesh_common.pruning import DAY, PruneSettings
from mesh_common.settings import (
    ServiceSettings,
    SettingsError,
    env_bool,
    env_choice,
    env_float,
    env_int,
    env_port,
    env_str,
)

from . import __version__
from .topology import RETRY_DELAYS, Topology

TlsMode = Literal["none", "starttls", "implicit"]
TLS_MODES: tuple[TlsMode, ...] = ("none", "starttls", "implicit")


@dataclass(frozen=True, slots=True)
class SmtpSettings:
    host: str
    port: int
    mail_from: str
    # No TLS, STARTTLS after the greeting, or TLS from the first byte
    # (SMTPS, port 465). With either TLS the server's certificate and name
    # are always verified: against ca_file (a PEM bundle) if set, else the
    # system's CAs.
    tls: TlsMode = "none"
    ca_file: str | None = None
    # SMTP AUTH once per session, both or neither. The password stays out of
    # the repr, which may reach a log (as mesh_common's consul_token).
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    # Seconds an attempt may take to reach DATA: connecting, TLS, EHLO, AUTH, MAIL, RCPT.
    timeout: float = 5.0
    # Seconds to wait for each answer once DATA has begun, the server's 250
    # above all: it may check the message first, and giving up on it early
    # leaves us not knowing whether the email went out.
    data_timeout: float = 30.0
    # Tries per message before the event goes to a retry queue: enough to
    # ride out a dropped connection, short enough not to hold a delivery slot.
    attempts: int = 3
    # Emails from one account to one mailbox in a rolling hour, of every kind,
    # and recipient_cap.MAILBOX_ACCOUNTS times that from all accounts:
    # addresses are not verified, and anyone can give us someone else's. Ten
    # is more than a person completing todos or reminded of them gets in an
    # hour, and bounds what one account can send a stranger to 240 a day.
    recipient_hourly_limit: int = 10


@dataclass(frozen=True, slots=True)
class Settings:
    service: ServiceSettings
    database_url: str
    amqp_url: str
    smtp: SmtpSettings
    client_secret: str = field(repr=False)  # out of the repr, which may reach a log
    client_id: str = "notification-service"
    user_service: str = "user-service"
    jwt_issuer: str = "todo-mesh"
    jwt_audience: str = "todo-mesh-api"
    topology: Topology = field(default_factory=Topology)
    prefetch: int = 32
    # How often an event that failed for a transient reason (SMTP or the
    # user-service down) may come back before it is given up on: about a day
    # at the slowest retry tier. Bugs have their own, small budget
    # (consumer.FAILURE_LIMIT).
    retry_limit: int = 2880
    reminder_lead: float = DAY
    reminder_poll_interval: float = 30.0
    # How long events are remembered (retention.py): older ones are refused,
    # and what only guarded against their redelivery is pruned.
    retention: int = 30 * DAY
    prune: PruneSettings = field(default_factory=PruneSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        settings = cls(
            service=ServiceSettings.from_env(env, name="notification-service", version=__version__),
            database_url=env_str(env, "DATABASE_URL"),
            amqp_url=env_str(env, "AMQP_URL"),
            smtp=smtp_from_env(env),
            client_id=env_str(env, "SERVICE_CLIENT_ID", "notification-service"),
            client_secret=env_str(env, "SERVICE_CLIENT_SECRET"),
            user_service=env_str(env, "USER_SERVICE_NAME", "user-service"),
            jwt_issuer=env_str(env, "JWT_ISSUER", "todo-mesh"),
            jwt_audience=env_str(env, "JWT_AUDIENCE", "todo-mesh-api"),
            topology=topology_from_env(env),
            prefetch=env_int(env, "AMQP_PREFETCH", 32),
            retry_limit=env_int(env, "RETRY_LIMIT", 2880),
            reminder_lead=env_float(env, "REMINDER_LEAD_SECONDS", DAY),
            reminder_poll_interval=env_float(env, "REMINDER_POLL_SECONDS", 30.0),
            retention=env_int(env, "EVENT_RETENTION_SECONDS", 30 * DAY),
            prune=PruneSettings.from_env(env),
        )
        smtp = settings.smtp
        if min(settings.prefetch, smtp.attempts) < 1 or min(settings.reminder_poll_interval, smtp.timeout) <= 0:
            raise SettingsError("AMQP_PREFETCH, SMTP_ATTEMPTS, SMTP_TIMEOUT and REMINDER_POLL_SECONDS must be positive")
        # Each of these failed only later, or quietly (as SMTP_PORT out of
        # range did, at the first send, before env_port): a lead of 0 or less
        # made every reminder due only once its todo was overdue, so none was
        # ever sent; a negative retry limit dead-lettered every passing
        # failure, and passed the retention check below whatever the retention.
        for name, value in [
            ("SMTP_DATA_TIMEOUT", smtp.data_timeout),
            ("REMINDER_LEAD_SECONDS", settings.reminder_lead),
            ("EVENT_RETENTION_SECONDS", settings.retention),
        ]:
            if value <= 0:
                raise SettingsError(f"{name} must be positive")
        if settings.retry_limit < 0:
            raise SettingsError("RETRY_LIMIT must not be negative")
        # 0 would send no email at all, and quietly: every one capped, acked, gone.
        if smtp.recipient_hourly_limit < 1:
            raise SettingsError("NOTIFY_RECIPIENT_HOURLY_LIMIT must be at least 1")
        # An event may come back from the retry queues this long after it
        # happened, and later still, since every attempt takes time of its
        # own (an SMTP timeout, a lookup): twice that, or good events still
        # being retried would be refused as expired.
        retrying = settings.retry_limit * RETRY_DELAYS[-1][1]
        if settings.retention < 2 * retrying:
            raise SettingsError(
                f"EVENT_RETENTION_SECONDS must be at least twice as long as retries wait ({retrying:.0f} s with"
                " RETRY_LIMIT)"
            )
        return settings

    def with_port(self, port: int) -> Settings:
        return replace(self, service=self.service.with_port(port))


def smtp_from_env(env: Mapping[str, str]) -> SmtpSettings:
    host = env_str(env, "SMTP_HOST", "127.0.0.1")
    tls = tls_mode(env)
    username = env_str(env, "SMTP_USERNAME", "") or None
    password = env_str(env, "SMTP_PASSWORD", "") or None
    if (username is None) != (password is None):
        raise SettingsError("SMTP_USERNAME and SMTP_PASSWORD must be set together, or neither")
    # Read even when it does not apply: a typo is refused, not ignored.
    insecure = env_bool(env, "SMTP_AUTH_INSECURE", False)
    if password is not None and tls == "none" and not is_loopback(host) and not insecure:
        raise SettingsError(
            f"SMTP_PASSWORD would be sent in clear to SMTP_HOST={host}: set SMTP_TLS to starttls or implicit"
            " (or SMTP_AUTH_INSECURE=true, for a development server only)"
        )
    return SmtpSettings(
        host=host,
        port=env_port(env, "SMTP_PORT", 1025, lowest=1),
        mail_from=mailbox(env_str(env, "MAIL_FROM", "todo-mesh <no-reply@todo-mesh.local>")),
        tls=tls,
        ca_file=ca_file(env, tls),
        username=username,
        password=password,
        timeout=env_float(env, "SMTP_TIMEOUT", 5.0),
        data_timeout=env_float(env, "SMTP_DATA_TIMEOUT", 30.0),
        attempts=env_int(env, "SMTP_ATTEMPTS", 3),
        recipient_hourly_limit=env_int(env, "NOTIFY_RECIPIENT_HOURLY_LIMIT", 10),
    )


def tls_mode(env: Mapping[str, str]) -> TlsMode:
    """``SMTP_TLS``, or ``SMTP_STARTTLS``, its older spelling: refused if the two disagree."""
    starttls = env_bool(env, "SMTP_STARTTLS") if env.get("SMTP_STARTTLS", "").strip() else None
    if not env.get("SMTP_TLS", "").strip():
        return "starttls" if starttls else "none"
    mode = cast(TlsMode, env_choice(env, "SMTP_TLS", TLS_MODES, "none"))
    if starttls is not None and starttls != (mode == "starttls"):
        raise SettingsError(
            f"SMTP_STARTTLS={env['SMTP_STARTTLS']} contradicts SMTP_TLS={mode}: set SMTP_TLS only"
            " (SMTP_STARTTLS=true is the older spelling of SMTP_TLS=starttls)"
        )
    return mode


def ca_file(env: Mapping[str, str], tls: TlsMode) -> str | None:
    """``SMTP_CA_FILE``, checked now: a missing or unreadable bundle would fail every send, each its own way."""
    path = env_str(env, "SMTP_CA_FILE", "") or None
    if path is None:
        return None
    if tls == "none":
        raise SettingsError("SMTP_CA_FILE is only used with TLS: set SMTP_TLS to starttls or implicit")
    try:
        ssl.create_default_context(cafile=path)
    except OSError as exc:  # missing, unreadable, a directory; ssl.SSLError: no PEM certificate in it
        raise SettingsError(f"SMTP_CA_FILE must be a readable PEM bundle of CA certificates: {path}: {exc}") from None
    return path


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine by its name or address: a password sent there never crosses a network.

    Only what says so itself; a name that resolves to loopback today may not tomorrow.
    """
    if host.lower().removesuffix(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def mailbox(mail_from: str) -> str:
    """``MAIL_FROM``, if it is one mailbox with a local part and a domain; ``SettingsError`` if not.

    It is the From header of every email, its envelope sender and the
    domain of every Message-ID, each parsed from it in its own way.
    "Acme, Inc. <noreply@acme.test>" is two mailboxes, the first "Acme":
    the envelope's MAIL FROM:<Acme>, and Message-IDs @Acme. "a@" made
    composing every email fail, "a@b..c" wrote From: <>.
    """
    refused = SettingsError(f"MAIL_FROM must be one mailbox, such as 'Name <user@example.com>', got {mail_from!r}")
    try:
        header = email.policy.default.header_factory("From", mail_from)
        envelope = parse_address(mail_from)
    # The email package refuses a header in several ways, not all ValueErrors (see messages.compose).
    except (ValueError, IndexError, AttributeError, email.errors.MessageError):
        raise refused from None
    parsed = getaddresses([mail_from])
    if not isinstance(header, AddressHeader) or len(header.groups) != 1 or len(parsed) != 1:
        raise refused
    [group] = header.groups
    if group.display_name is not None or len(group.addresses) != 1:  # a group ("team: a@b;") is no mailbox
        raise refused
    [address] = group.addresses
    if not (address.username and address.domain and address.addr_spec == parsed[0][1] == envelope):
        raise refused
    return mail_from


def topology_from_env(env: Mapping[str, str]) -> Topology:
    """The broker names; only tests change them, to get a private copy."""
    return Topology(
        exchange=env_str(env, "EVENTS_EXCHANGE", EVENTS_EXCHANGE),
        namespace=env_str(env, "NOTIFICATION_QUEUES", "notifications"),
    )
