"""HTTP to the stack's own parts, which all listen on loopback.

Never through a proxy: http_proxy names one for the outside world, and
urllib's default opener would send 127.0.0.1 to it too (unless no_proxy
says otherwise), where our ports cannot be reached.
"""

from __future__ import annotations

import json
import urllib.request

DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get_json(url: str, timeout: float = 2.0) -> object:
    with DIRECT.open(url, timeout=timeout) as resp:
        return json.load(resp)
