"""Streamed bodies: the upstream is judged by how it sends, never by how our client reads."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager

from aiohttp import web
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs

from mesh_common.testing import TokenFactory, eventually
from mesh_gateway.keys import BREAKERS

from .conftest import HUGE


@asynccontextmanager
async def raw_get(
    client: TestClient[web.Request, web.Application], tokens: TokenFactory
) -> AsyncIterator[tuple[asyncio.StreamReader, int | None]]:
    """GET /api/v1/things on a socket whose small receive buffer makes a slow reader really slow.

    Yields the reader, positioned after the head, and the Content-Length.
    """
    sock = socket.socket()
    # Set before connecting, so that the window stays small; the kernel doubles it.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", client.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    auth = tokens.headers()["Authorization"]
    writer.write(f"GET /api/v1/things HTTP/1.1\r\nHost: gw\r\nAuthorization: {auth}\r\n\r\n".encode())
    try:
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode()
        assert head.startswith("HTTP/1.1 200"), head
        lengths = [line.split(":", 1)[1] for line in head.split("\r\n") if line.lower().startswith("content-length:")]
        yield reader, int(lengths[0]) if lengths else None
    finally:
        writer.close()


def logged(logs: Sequence[Mapping[str, object]], event: str) -> list[Mapping[str, object]]:
    return [e for e in logs if e["event"] == event]


async def test_a_slow_but_steady_client_gets_the_whole_body_and_the_upstream_is_not_blamed(
    fake_service, gateway, tokens
):
    service = await fake_service(1)
    (instance,) = service.instances
    instance.mode = "huge"
    # The whole download takes well over the route's timeout; no single wait does.
    client = await gateway(service, route_timeout=0.3)
    received = 0
    async with raw_get(client, tokens) as (reader, length):
        assert length == HUGE
        while received < HUGE:
            chunk = await asyncio.wait_for(reader.read(64 * 1024), 5)
            if not chunk:
                break
            received += len(chunk)
            await asyncio.sleep(0.01)  # the client's own pace: about 6 MB/s
    assert received == HUGE
    assert client.app[BREAKERS].failures(instance.service_id) == 0


async def test_a_client_that_stops_reading_is_cut_without_blaming_the_upstream(fake_service, gateway, tokens):
    service = await fake_service(1)
    (instance,) = service.instances
    instance.mode = "huge"
    client = await gateway(service, route_timeout=0.3)
    with capture_logs() as logs:
        async with raw_get(client, tokens):
            # Read nothing more: the gateway's writes wait, then give up on us.
            await eventually(lambda: logged(logs, "request"), within=5)
    assert client.app[BREAKERS].failures(instance.service_id) == 0
    assert not logged(logs, "upstream_stream_broken")
    assert logged(logs, "client_gone_mid_stream")


async def test_a_client_that_hangs_up_mid_stream_is_not_an_error(fake_service, gateway, tokens):
    service = await fake_service(1)
    (instance,) = service.instances
    client = await gateway(service, breaker_failures=5)
    instance.mode = "fail"
    for _ in range(2):
        async with client.get("/api/v1/things", headers=tokens.headers()) as r:
            assert r.status == 500
    instance.mode = "trickle"
    with capture_logs() as logs:
        async with raw_get(client, tokens) as (_, length):
            assert length is None  # streamed, chunked
        # Hung up: the gateway notices at its next write, within a few chunks.
        await eventually(lambda: logged(logs, "request"), within=5)
    instance.stop_trickle.set()
    assert not logged(logs, "unhandled_error")
    assert logged(logs, "client_gone_mid_stream")
    assert client.app[BREAKERS].failures(instance.service_id) == 2  # neither counted nor reset
    # The upstream's connection was let go, and the gateway serves on.
    instance.mode = "ok"
    async with client.get("/api/v1/things", headers=tokens.headers()) as r:
        assert r.status == 200


async def test_a_client_that_hangs_up_mid_upload_is_not_an_error(fake_service, gateway, tokens):
    service = await fake_service(1)
    client = await gateway(service)
    auth = tokens.headers()["Authorization"]
    with capture_logs() as logs:
        _, writer = await asyncio.open_connection("127.0.0.1", client.port)
        # A body promised at 100 bytes, 10 sent, then gone: a cancelled upload,
        # or Envoy's slow-client guard cutting the connection mid-body.
        head = f"POST /api/v1/things HTTP/1.1\r\nHost: gw\r\nAuthorization: {auth}\r\nContent-Length: 100\r\n\r\n"
        writer.write(head.encode() + b"x" * 10)
        await writer.drain()
        writer.close()
        await eventually(lambda: logged(logs, "request"), within=5)
    assert not logged(logs, "unhandled_error")
    assert logged(logs, "client_gone_before_body")
    (access,) = logged(logs, "request")
    assert access["status"] == 499  # the client's doing, as nginx counts it: not a 5xx
    assert service.hits == 0
