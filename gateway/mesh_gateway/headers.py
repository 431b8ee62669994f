"""The headers a proxied request and its answer carry on, and those they must not.

Hop-by-hop headers (RFC 9110, 7.6.1) stop at the gateway, in both
directions; the gateway sets the X-Forwarded-* headers from its own view.
"""

from __future__ import annotations

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from mesh_common.deadlines import BUDGET_HEADER
from mesh_common.problems import PROBLEM_JSON
from mesh_common.requests import REQUEST_ID

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        # Not in RFC 9110, but old clients send it, and it means what Connection does.
        "Proxy-Connection",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
        # The gateway answered any "Expect: 100-continue" itself.
        "Expect",
    )
)


def without_hop_by_hop(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    # Copy whole (in C), then drop the few that must not travel: cheaper on
    # every request than filtering each header in Python.
    kept = CIMultiDict(headers)
    for name in HOP_BY_HOP:
        kept.popall(name, None)
    for token in ",".join(headers.getall("Connection", ())).split(","):
        if token.strip():
            kept.popall(token.strip(), None)
    return kept


def is_problem(headers: CIMultiDict[str]) -> bool:
    media_type = headers.get("Content-Type", "").partition(";")[0]
    return media_type.strip().lower() == PROBLEM_JSON


def inflated_by_aiohttp(encoding: str) -> bool:
    # aiohttp's parser inflates a request body in these encodings as it is
    # read (and refuses br or zstd it has no library for); its rule, exactly.
    return encoding.isascii() and encoding.lower() in {"gzip", "deflate", "br", "zstd"}


def forward_headers(request: web.Request) -> CIMultiDict[str]:
    headers = without_hop_by_hop(request.headers)
    peer = request.remote or ""
    # From the copy: a client that names X-Forwarded-For in Connection has
    # it dropped like any hop-by-hop header (RFC 9110, 7.6.1).
    prior = headers.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    # The gateway's own view, never a client's say: Envoy passes a client's
    # X-Forwarded-Host on, and a direct caller could send either.
    headers["X-Forwarded-Proto"] = request.scheme
    headers["X-Forwarded-Host"] = request.host
    headers["X-Request-ID"] = request[REQUEST_ID]
    # The gateway's own, set as the request leaves (upstream.BudgetHeader):
    # a client's could only ever shorten its own request, but is not its say.
    headers.popall(BUDGET_HEADER, None)
    return headers
