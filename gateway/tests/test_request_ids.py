"""Request ids: the client's if it is safe, one of the gateway's own if not; sent on, sent back and logged."""

from __future__ import annotations

import re

import pytest
import structlog
from structlog.testing import capture_logs


async def test_request_id_and_forwarded_headers_reach_the_upstream(fake_service, gateway, tokens):
    service = await fake_service(1)
    client = await gateway(service)
    headers = {**tokens.headers(), "X-Request-ID": "req-123", "Connection": "keep-alive, X-Secret", "X-Secret": "s"}
    async with client.get("/api/v1/things/deep?x=1", headers=headers) as r:
        body = await r.json()
        assert r.headers["X-Request-ID"] == "req-123"
    assert body["request_id"] == "req-123"
    assert body["path"] == "/things/deep"
    assert body["forwarded_for"]


async def test_a_streamed_answer_carries_the_request_id(fake_service, gateway, tokens):
    service = await fake_service(1)
    service.instances[0].mode = "large"  # 1 MiB: streamed, from an upstream that does not echo the id
    client = await gateway(service)
    async with client.get("/api/v1/things", headers={**tokens.headers(), "X-Request-ID": "r-1"}) as r:
        assert len(await r.read()) == 1024 * 1024
        assert r.headers["X-Request-ID"] == "r-1"


@pytest.mark.parametrize("sent", [None, "has spaces", "x" * 129, "ok\u00e9"])
async def test_a_missing_or_unsafe_request_id_is_replaced_by_one_of_the_gateways(fake_service, gateway, tokens, sent):
    service = await fake_service(1)
    client = await gateway(service)
    headers = tokens.headers() | ({} if sent is None else {"X-Request-ID": sent})
    async with client.get("/api/v1/things", headers=headers) as r:
        body = await r.json()
        returned = r.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", returned)  # 128 random bits
    assert body["request_id"] == returned  # the upstream got the same one


async def test_each_request_is_one_access_log_line_naming_its_upstream(fake_service, gateway, tokens):
    service = await fake_service(1)
    (instance,) = service.instances
    client = await gateway(service)
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        async with client.get("/api/v1/things", headers={**tokens.headers(), "X-Request-ID": "one-line"}) as r:
            assert r.status == 200
            await r.read()
    (line,) = [e for e in logs if e["event"] == "request"]
    assert line["request_id"] == "one-line"
    assert line["upstream"] == instance.service_id
    assert line["status"] == 200
    assert line["method"] == "GET" and line["path"] == "/api/v1/things"
    assert line["duration_ms"] >= 0
