"""One mailbox however its address is spelt: what the recipient cap counts by, and the SMTP cooldown compares.

The address in lower case, without a "+tag" (sub-addressing: ada+1@ and
ada+2@ reach one mailbox), its domain in IDNA form. Lower case is not
RFC 5321's (a local part may be case-sensitive), but it is every large
provider's, and two people whose addresses differ only in case are far
rarer than one person spelling theirs two ways. Other aliases a provider
may have (Gmail's dots) are not folded.
"""

from __future__ import annotations

import contextlib


def mailbox_key(address: str) -> str:
    local, _, domain = address.rpartition("@")
    local = local.split("+", 1)[0] or local
    with contextlib.suppress(UnicodeError):  # a label IDNA 2003 refuses: kept as spelt
        domain = domain.encode("idna").decode("ascii")
    return f"{local.lower()}@{domain.lower()}"
