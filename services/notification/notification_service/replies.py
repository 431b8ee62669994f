"""What an SMTP answer, or its absence, says about the message: whether the server has it, and whose fault a refusal is.

Before DATA, and at DATA until the server's 354, the server does not have
the message. A 4xx, a timeout or a dropped connection are
``MailServerUnavailable``: tried again. A 5xx is final.

Whose fault a 5xx is decides what becomes of the event. The recipient's or
the message's (``MailRejected``: the DLQ, the reminder cancelled) at RCPT
and after DATA, unless its enhanced status code (RFC 3463) says the server
refuses us: X.7 security or policy (relaying denied, a blocklist, DMARC),
X.3 the mail system (but X.3.4, the message too big) or X.4 the network and
routing. Those are ``MailServerUnavailable`` (``RefusedUs``), as is any 5xx
before RCPT: a configuration or a reputation to put right, with the events
and reminders kept meanwhile, not given up on one by one. Without an
enhanced code (or with X.0, "undefined") a 5xx says nothing more, and is
taken as before: the recipient's or the message's at RCPT and after DATA,
ours before RCPT. 552 is the message too big (RFC 1870) whatever follows it.

X.4.1 at RCPT is ours too, whatever the reply's text: "550 5.4.1 Relay
Access Denied" is what Exchange Online Protection answers every RCPT while
the sender's connector is missing or wrong. Taken as the recipient's, it
dead-lettered every welcome and completion and cancelled every reminder
for a relay's configuration. The same status is also its directory-based
edge blocking of an address that does not exist ("550 5.4.1 Recipient
address rejected: Access denied"), but only the reply's free text tells
the two apart, and no text is a contract: a mistyped address is retried
(counted as refused alone by session_cooldown.py, holding nobody back)
rather than risk losing everyone's email.

Opening the session can fail for a reason of ours too, the same for every
message until the settings or the server's certificate are put right:
``LoginRefused`` (a 5xx to AUTH, 535 above all; or a server that does not
offer AUTH, or no mechanism aiosmtplib knows) and ``TlsFailed`` (a
certificate that does not verify, a handshake that fails, STARTTLS not
offered). Both are ``RefusedUs``: final for now, retried only through the
retry queues. A 4xx to AUTH (454) is the server busy, like any 4xx; a
timeout or a dropped connection during the handshake is an outage. Any
``RefusedUs`` before DATA may hold back the sessions that follow it: see
session_cooldown.py.

Once the message has begun to go out, an answer still says what became of
it, and no answer (a timeout, a dropped connection) does not:
``MailOutcomeUnknown``.
"""

from __future__ import annotations

import re
import ssl

import aiosmtplib

from .addresses import mailbox_key
from .failures import MailOutcomeUnknown, MailRejected, MailServerUnavailable


class UnavailableAtData(MailServerUnavailable):
    """DATA refused for now (4xx), or not answered: nothing delivered, but the attempt has spent its DATA timeouts."""


class RefusedUs(MailServerUnavailable):
    """A 5xx that refuses us, not the message: final for now, so not tried again at once.

    ``recipients``: the mailboxes refused (``addresses.mailbox_key``), when
    it came at RCPT. A block of ours refuses every recipient alike, while a
    policy about one may carry the same status: session_cooldown.py tells
    them apart by it. Kept in memory only, never in a log, as the reply's
    text is not.
    """

    def __init__(self, reason: str, *, recipients: frozenset[str] = frozenset()) -> None:
        super().__init__(reason)
        self.recipients = recipients


class LoginRefused(RefusedUs):
    """The server refused our login, or offers none we can use: SMTP_USERNAME, SMTP_PASSWORD or SMTP_TLS to fix."""


class TlsFailed(RefusedUs):
    """TLS with the server failed: its certificate (SMTP_CA_FILE, SMTP_HOST), no STARTTLS, or SMTP_TLS wrong."""


# An enhanced status code (RFC 3463) at the start of a reply's text: class.subject.detail.
_ENHANCED_STATUS = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?!\S)")


def before_data(exc: aiosmtplib.SMTPException | OSError) -> Exception:
    """The server does not have the message: an answer says whether to try again."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [r.code for r in exc.recipients]
        if all(_transient(code) for code in codes):
            return MailServerUnavailable(f"recipients deferred: {codes}")
        statuses = [_status(r.code, r.message) for r in exc.recipients]
        if all(_transient(r.code) or _refuses_us(r.code, r.message) for r in exc.recipients):
            refused = frozenset(mailbox_key(r.recipient) for r in exc.recipients)
            return RefusedUs(f"recipients refused, for a reason of ours: {statuses}", recipients=refused)
        return MailRejected(f"recipients refused: {statuses}")
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        # aiosmtplib's only use of it: an address is not ASCII and the server
        # does not offer SMTPUTF8. That is the address's lot with this server,
        # not an outage: retrying would fail the same way for a day.
        return MailRejected("the server does not offer SMTPUTF8, which the address needs")
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError) and not _transient(exc.code):
        # Its text is dropped as any reply's, and may name the account.
        return LoginRefused(f"SMTP {_status(exc.code, exc.message)} to AUTH: the server refuses our login")
    if isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code == 552:
        # At MAIL FROM, with the SIZE we declare: this message is too big (RFC 1870).
        return MailRejected("SMTP 552: the message is too big")
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        # Any other refusal before DATA (the greeting, EHLO, STARTTLS, AUTH,
        # MAIL FROM) refuses us, whatever the message: a configuration to put
        # right, with the events kept meanwhile, not each one given up on.
        error = RefusedUs if exc.code >= 500 else MailServerUnavailable
        return error(f"SMTP {_status(exc.code, exc.message)}, before any recipient")
    tls = _tls_error(exc)
    if tls is not None:
        # CERTIFICATE_VERIFY_FAILED and why: "unable to get local issuer certificate", "Hostname mismatch..."
        why = ": ".join(str(part) for part in (tls.reason, getattr(tls, "verify_message", None)) if part)
        return TlsFailed(f"TLS with the server failed: {why or type(tls).__name__}")
    if type(exc) is aiosmtplib.SMTPException:
        # aiosmtplib's own refusal to go on while opening the session: the
        # server does not offer AUTH or a mechanism it knows ("The SMTP AUTH
        # extension...", "No suitable authentication method..."), or STARTTLS.
        # Its text is its own, never the server's.
        failure = LoginRefused if "auth" in str(exc).lower() else TlsFailed
        return failure(f"the server does not offer what the settings need: {exc}")
    # Refused, timed out or disconnected (aiosmtplib's connection errors are
    # OSErrors too, and so is the attempt's TimeoutError).
    return MailServerUnavailable(type(exc).__name__)


def _tls_error(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error ``exc`` is, or wraps (implicit TLS fails in aiosmtplib's ``SMTPConnectError``).

    Not the server closing the connection during the handshake: that is a
    disconnection like any other.
    """
    for error in (exc, exc.__cause__):
        if isinstance(error, ssl.SSLError) and not isinstance(error, ssl.SSLEOFError | ssl.SSLZeroReturnError):
            return error
    return None


def at_data(exc: Exception, *, body_started: bool) -> Exception:
    """DATA had begun: once the message has begun to go out, only an answer says the server does not have it."""
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        reply = f"SMTP {_status(exc.code, exc.message)} after DATA"
        if _transient(exc.code):
            return UnavailableAtData(reply)
        return (RefusedUs if _refuses_us(exc.code, exc.message) else MailRejected)(reply)
    if not body_started:  # no 354: the message never left
        return UnavailableAtData(f"no answer to DATA: {type(exc).__name__}")
    return MailOutcomeUnknown(f"no answer after DATA: {type(exc).__name__}")


def _transient(code: int) -> bool:
    return 400 <= code < 500


def _status(code: int, message: str) -> str:
    """The reply's code, and its enhanced status code if it has one: not its text, which may name the recipient."""
    status = _ENHANCED_STATUS.match(message.lstrip())
    return f"{code} {status[0]}" if status else str(code)


def _refuses_us(code: int, message: str) -> bool:
    """Whether a 5xx's enhanced status code says it refuses us, not the recipient or the message.

    False when it does not say: no enhanced code, one of another class than
    the reply's, or X.0 (other or undefined).
    """
    if code == 552:  # the message too big (RFC 1870), or the mailbox full: not ours to put right
        return False
    status = _ENHANCED_STATUS.match(message.lstrip())
    if status is None or status[1] != str(code)[0]:
        return False
    subject, detail = status[2], status[3]
    if (subject, detail) == ("3", "4"):  # "message too big for system"
        return False
    return subject in {"3", "4", "7"}
