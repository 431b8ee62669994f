"""The one digest the user-service keeps secrets under.

Refresh tokens and verification codes are stored as their SHA-256, never
as themselves (a database read does not hand out sessions), and client
secrets are compared as theirs, all of one length. A salt is not needed:
each of these is random and long, not a password.
"""

from __future__ import annotations

import hashlib


def sha256(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()
