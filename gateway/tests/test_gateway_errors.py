"""What the gateway answers for an upstream that fails it: a 504 for a timeout, a 502 for a 5xx it cannot pass on."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator


@contextlib.contextmanager
def unanswered_port() -> Iterator[int]:
    """A loopback port whose connections hang: its accept queue is full, and never drained."""
    with socket.socket() as listener, contextlib.ExitStack() as fillers:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        for _ in range(3):
            filler = fillers.enter_context(socket.socket())
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        yield port


async def test_an_instance_that_never_answers_the_connect_is_a_504(fake_service, gateway, tokens, consul):
    service = await fake_service(1)
    (instance,) = service.instances
    with unanswered_port() as port:
        moved = {"Name": service.name, "ID": instance.service_id, "Address": "127.0.0.1", "Port": port}
        async with consul.put(
            "/v1/agent/service/register", json={**moved, "Check": {"TTL": "60s", "Status": "passing"}}
        ):
            pass
        client = await gateway(service)
        async with client.get("/api/v1/things", headers=tokens.headers()) as r:
            assert r.status == 504  # a timeout, connecting: not "could not be reached"
            assert (await r.json())["code"] == "UPSTREAM_TIMEOUT"


async def test_upstream_timeout_is_504(fake_service, gateway, tokens):
    service = await fake_service(1)
    service.instances[0].mode = "hang"
    client = await gateway(service, route_timeout=0.3)
    key = {"Idempotency-Key": "k-1"}
    for method, headers in (("GET", {}), ("POST", key)):  # safe to send again
        async with client.request(method, "/api/v1/things", json={}, headers={**tokens.headers(), **headers}) as r:
            assert r.status == 504
            assert (await r.json())["code"] == "UPSTREAM_TIMEOUT"


async def test_a_timeout_once_a_request_not_safe_to_repeat_was_sent_is_an_unknown_outcome(
    fake_service, gateway, tokens
):
    # The service may yet make the change (a COMMIT it let finish): a client
    # that sent it again on a plain 504 could make it twice.
    service = await fake_service(1)
    service.instances[0].mode = "hang"
    client = await gateway(service, route_timeout=0.3)
    key = {"Idempotency-Key": "k-2"}
    for path, headers in (("/api/v1/things", {}), ("/api/v1/things/1/complete", key)):  # a key not honoured there
        async with client.post(path, json={}, headers={**tokens.headers(), **headers}) as r:
            assert r.status == 504
            assert "Retry-After" not in r.headers
            assert (await r.json())["code"] == "UPSTREAM_OUTCOME_UNKNOWN"


async def test_a_5xx_that_is_not_a_problem_is_a_502_problem(fake_service, gateway, tokens):
    service = await fake_service(1)
    service.instances[0].mode = "fail_plain"
    client = await gateway(service)
    async with client.get("/api/v1/things", headers=tokens.headers()) as r:
        assert r.status == 502
        assert r.content_type == "application/problem+json"
        assert (await r.json())["code"] == "BAD_GATEWAY"  # and no stack trace


async def test_a_5xx_too_large_to_hold_is_a_502_not_a_buffer(fake_service, gateway, tokens):
    service = await fake_service(1)
    (broken,) = service.instances
    broken.mode = "fail_huge"
    client = await gateway(service)
    async with client.get("/api/v1/things", headers=tokens.headers()) as r:
        assert r.status == 502
        assert r.content_type == "application/problem+json"
        assert len(await r.read()) < 4096
