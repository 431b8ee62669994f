"""The gateway's own upstream client, against real sockets.

Well-behaved upstreams are aiohttp servers; misbehaving ones (cut bodies,
garbage, informational responses) are raw asyncio servers, because aiohttp
will not misbehave on request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from mesh_common.testing import eventually, refused_port
from mesh_gateway.upstream import (
    HIGH_WATER,
    PoolTimeout,
    Upstream,
    UpstreamBroken,
    UpstreamConnectError,
    request_head,
)

Reply = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    client = Upstream(limit_per_host=4, connect_timeout=0.5)
    yield client
    client.close()


async def echo_server(aiohttp_server: AiohttpServer, **kwargs: Any) -> tuple[int, list[tuple[str, int]]]:
    """An upstream that records the client port of every request it answers; its port, and those client ports."""
    peers: list[tuple[str, int]] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
        if request.path == "/chunked":
            response = web.StreamResponse()
            await response.prepare(request)
            for part in (b"one,", b"two,", b"three"):
                await response.write(part)
            await response.write_eof()
            return response
        if request.path == "/large":
            return web.Response(body=b"x" * (5 * HIGH_WATER))
        if request.path == "/slow":
            await asyncio.sleep(0.2)
        body = await request.read()
        return web.json_response({"method": request.method, "body": body.decode(), "a": request.headers.get("X-A")})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    server = await aiohttp_server(app, **kwargs)
    assert server.port is not None  # started
    return server.port, peers


@asynccontextmanager
async def raw_server(reply: Reply) -> AsyncIterator[int]:
    """A server that reads one request head, answers with ``reply``, and hangs up; yields its port."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            await reply(reader, writer)
        finally:  # also when the test ends first and the handler is cancelled
            writer.close()

    async with await asyncio.start_server(handle, "127.0.0.1", 0) as server:
        yield int(server.sockets[0].getsockname()[1])


async def test_requests_share_one_kept_alive_connection(upstream: Upstream, aiohttp_server: AiohttpServer) -> None:
    port, peers = await echo_server(aiohttp_server)
    for n in range(5):
        resp = await upstream.request("POST", "127.0.0.1", port, "/x", [("X-A", "b")], f"body {n}".encode())
        assert resp.status == 200
        assert (await resp.read()) == f'{{"method": "POST", "body": "body {n}", "a": "b"}}'.encode()
    assert len(set(peers)) == 1, peers


async def test_a_response_finished_after_close_closes_its_connection(
    upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    # A stream that outlives the gateway's shutdown: its connection must not
    # go back to a closed pool, where nothing would ever close it.
    port, _ = await echo_server(aiohttp_server)
    resp = await upstream.request("GET", "127.0.0.1", port, "/large", [])
    conn = resp._conn
    assert conn is not None and conn.transport is not None
    upstream.close()
    assert len(await resp.read()) == 5 * HIGH_WATER  # read to the end: reusable, but not kept
    assert conn.transport is None or conn.transport.is_closing()


async def test_no_more_connections_than_the_limit(upstream: Upstream, aiohttp_server: AiohttpServer) -> None:
    port, peers = await echo_server(aiohttp_server)

    async def one() -> int:
        resp = await upstream.request("GET", "127.0.0.1", port, "/slow", [])
        await resp.read()
        return resp.status

    assert await asyncio.gather(*(one() for _ in range(12))) == [200] * 12
    assert len(set(peers)) == 4, peers  # limit_per_host=4, each reused


async def test_a_chunked_body_arrives_whole(upstream: Upstream, aiohttp_server: AiohttpServer) -> None:
    port, _ = await echo_server(aiohttp_server)
    resp = await upstream.request("GET", "127.0.0.1", port, "/chunked", [])
    assert resp.content_length is None
    assert await resp.read() == b"one,two,three"


async def test_head_ends_at_the_head_and_the_next_request_still_works(
    upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    port, _ = await echo_server(aiohttp_server)
    head = await upstream.request("HEAD", "127.0.0.1", port, "/x", [])
    assert head.status == 200 and head.content_length is not None and head.content_length > 0
    assert await asyncio.wait_for(head.read(), 2) == b""
    resp = await upstream.request("GET", "127.0.0.1", port, "/x", [])
    assert resp.status == 200 and b'"GET"' in await resp.read()


async def test_a_refused_connection_was_never_sent(upstream: Upstream) -> None:
    with refused_port() as port, pytest.raises(UpstreamConnectError):
        await upstream.request("GET", "127.0.0.1", port, "/", [])


async def test_a_body_cut_short_is_broken_and_the_connection_is_dropped(upstream: Upstream) -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
        await writer.drain()

    async with raw_server(cut) as port:
        resp = await upstream.request("GET", "127.0.0.1", port, "/", [])
        with pytest.raises(UpstreamBroken):
            await resp.read()
        assert upstream._pools[("127.0.0.1", port)].idle == []


async def test_garbage_is_not_a_response(upstream: Upstream) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SMTP ready, not HTTP\r\n\r\n")
        await writer.drain()

    async with raw_server(garbage) as port:
        with pytest.raises(UpstreamBroken):
            await upstream.request("GET", "127.0.0.1", port, "/", [])


@pytest.mark.parametrize("shape", ["one long header", "many headers"])
async def test_a_head_past_its_bound_is_broken_not_held(upstream: Upstream, shape: str) -> None:
    # 4 MiB of head, sent without end: read and kept whole, an upstream
    # could hold the gateway's memory (50 MB of headers grew it to 1 GB).
    piece = (
        b"X-A: " + b"a" * (4 * 1024 * 1024) + b"\r\n"
        if shape == "one long header"
        else b"X-A: 0123456789\r\n" * 250_000
    )

    async def bloated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n" + piece)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        await reader.read()  # never the end of the head

    async with raw_server(bloated) as port, asyncio.timeout(5):
        with pytest.raises(UpstreamBroken, match="head"):
            await upstream.request("GET", "127.0.0.1", port, "/", [])


async def test_informational_responses_are_skipped(upstream: Upstream) -> None:
    async def continue_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\nX-B: c\r\n\r\nok")
        await writer.drain()

    async with raw_server(continue_first) as port:
        resp = await upstream.request("POST", "127.0.0.1", port, "/", [], b"{}")
        assert (resp.status, resp.headers["X-B"], await resp.read()) == (201, "c", b"ok")


async def test_a_slow_reader_pauses_the_upstream_instead_of_buffering(
    upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    port, _ = await echo_server(aiohttp_server)
    resp = await upstream.request("GET", "127.0.0.1", port, "/large", [])
    conn = resp._conn
    assert conn is not None and conn.transport is not None
    for _ in range(200):  # nobody reads: the socket must pause, bounded wait
        if not conn.transport.is_reading():
            break
        await asyncio.sleep(0.01)
    assert not conn.transport.is_reading()
    assert conn._buffered <= HIGH_WATER + 256 * 1024
    assert len(await resp.read()) == 5 * HIGH_WATER


async def test_a_deadline_frees_the_connection_slot(aiohttp_server: AiohttpServer) -> None:
    port, _ = await echo_server(aiohttp_server)
    upstream = Upstream(limit_per_host=1)
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await upstream.request("GET", "127.0.0.1", port, "/slow", [])
        resp = await asyncio.wait_for(upstream.request("GET", "127.0.0.1", port, "/x", []), 2)
        assert resp.status == 200 and await resp.read()
    finally:
        upstream.close()


async def test_a_connection_the_upstream_closed_while_idle_is_replaced(
    upstream: Upstream, aiohttp_server: AiohttpServer
) -> None:
    port, peers = await echo_server(aiohttp_server, keepalive_timeout=0.1)
    resp = await upstream.request("GET", "127.0.0.1", port, "/x", [])
    await resp.read()
    pool = upstream._pools[("127.0.0.1", port)]
    for _ in range(200):  # until the upstream's keep-alive timeout closes it
        if not pool.idle:
            break
        await asyncio.sleep(0.01)
    assert not pool.idle
    resp = await upstream.request("GET", "127.0.0.1", port, "/x", [])
    assert resp.status == 200 and await resp.read()
    assert len(set(peers)) == 2


async def test_an_idle_connection_is_closed_once_its_keepalive_runs_out(aiohttp_server: AiohttpServer) -> None:
    # The upstream would keep it for 75 s: closing it is the client's job.
    port, _ = await echo_server(aiohttp_server)
    upstream = Upstream(keepalive=0.1)
    try:
        resp = await upstream.request("GET", "127.0.0.1", port, "/x", [])
        conn = resp._conn
        await resp.read()
        pool = upstream._pools[("127.0.0.1", port)]
        assert pool.idle == [conn]
        await eventually(lambda: not pool.idle, within=2)
        assert conn is not None
        await eventually(lambda: conn.transport is None, within=1)  # closed, not only forgotten
    finally:
        upstream.close()


async def test_the_pool_of_an_address_no_longer_used_is_forgotten(aiohttp_server: AiohttpServer) -> None:
    # Instances come and go on new addresses; their pools must not pile up.
    gone, _ = await echo_server(aiohttp_server)
    busy, _ = await echo_server(aiohttp_server)
    upstream = Upstream(keepalive=0.1)
    try:
        await (await upstream.request("GET", "127.0.0.1", gone, "/x", [])).read()
        streaming = await upstream.request("GET", "127.0.0.1", busy, "/x", [])  # lent out, not read
        await eventually(lambda: not upstream._pools[("127.0.0.1", gone)].idle, within=2)
        new, _ = await echo_server(aiohttp_server)
        await (await upstream.request("GET", "127.0.0.1", new, "/x", [])).read()
        assert set(upstream._pools) == {("127.0.0.1", busy), ("127.0.0.1", new)}
        await streaming.read()  # and the pool kept for it still works
        again = await upstream.request("GET", "127.0.0.1", busy, "/x", [])
        assert again.status == 200 and b'"GET"' in await again.read()
    finally:
        upstream.close()


async def test_a_pool_whose_slot_was_just_handed_to_a_waiter_is_kept(aiohttp_server: AiohttpServer) -> None:
    x, _ = await echo_server(aiohttp_server)
    y, _ = await echo_server(aiohttp_server)
    upstream = Upstream(limit_per_host=1)
    try:
        held = await upstream.request("GET", "127.0.0.1", x, "/large", [])
        waiter = asyncio.create_task(upstream.request("GET", "127.0.0.1", x, "/x", []))
        slots = upstream._pools[("127.0.0.1", x)]._slots
        async with asyncio.timeout(2):
            while not slots._waiters:  # until it waits for the one slot
                await asyncio.sleep(0)
        with pytest.raises(UpstreamBroken):
            await held.read(limit=1)  # its connection closed, its slot handed to the waiter...
        # ...which has not run yet, when a request to a new address sweeps the pools.
        await (await upstream.request("GET", "127.0.0.1", y, "/x", [])).read()
        assert ("127.0.0.1", x) in upstream._pools
        await (await waiter).read()
    finally:
        upstream.close()


async def test_a_deadline_tells_whether_the_request_left(aiohttp_server: AiohttpServer) -> None:
    port, peers = await echo_server(aiohttp_server)
    upstream = Upstream(limit_per_host=1)
    loop = asyncio.get_running_loop()
    try:
        held = await upstream.request("GET", "127.0.0.1", port, "/large", [])  # the one connection, unread
        with pytest.raises(PoolTimeout):
            await upstream.request("GET", "127.0.0.1", port, "/x", [], deadline=loop.time() + 0.05)
        assert len(peers) == 1  # the second request never left
        await held.read()
        with pytest.raises(TimeoutError):
            await upstream.request("GET", "127.0.0.1", port, "/slow", [], deadline=loop.time() + 0.05)
        await eventually(lambda: len(peers) == 2, within=2)  # this one did
    finally:
        upstream.close()


async def test_a_response_nobody_asked_for_joins_no_answer(upstream: Upstream) -> None:
    served = 0
    connections = {"open": 0, "closed": 0}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        connections["open"] += 1
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                served += 1
                if served == 1:  # the answer, and in the same write a second one nobody asked for
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nevil!")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            connections["closed"] += 1

    async with await asyncio.start_server(handle, "127.0.0.1", 0) as server:
        port = int(server.sockets[0].getsockname()[1])
        first = await upstream.request("GET", "127.0.0.1", port, "/", [])
        assert await first.read() == b"first"
        # The connection that carried the stray answer is not reused.
        second = await upstream.request("GET", "127.0.0.1", port, "/", [])
        assert await second.read() == b"second"
        upstream.close()  # so that the handler sees the end and closes its side
        await eventually(lambda: connections["closed"] == connections["open"] == 2)


async def test_a_response_received_whole_but_not_read_leaves_its_connection_usable(
    aiohttp_server: AiohttpServer,
) -> None:
    # Just over the high-water mark: the read that pauses the socket is the
    # one that completes the response. Its reader then goes away (a client
    # that disconnected), and the connection goes back to the pool, paused.
    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * (HIGH_WATER + 1))

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    server = await aiohttp_server(app)
    assert server.port is not None  # started
    upstream = Upstream(limit_per_host=1)  # so that the next request gets that connection
    try:
        resp = await upstream.request("GET", "127.0.0.1", server.port, "/big", [])
        conn = resp._conn
        assert conn is not None
        await eventually(lambda: conn._complete, within=5)
        resp.release()
        # Idle, it reads again: to see the upstream close it, or send what nobody asked for.
        assert conn.transport is not None and conn.transport.is_reading()
        again = await asyncio.wait_for(upstream.request("GET", "127.0.0.1", server.port, "/big", []), 5)
        assert again._conn is conn  # the same connection, reused and reading
        assert len(await asyncio.wait_for(again.read(), 5)) == HIGH_WATER + 1
    finally:
        upstream.close()


async def test_trailer_fields_are_not_headers(upstream: Upstream) -> None:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: Set-Cookie\r\n\r\n"
            b"2\r\nok\r\n0\r\nSet-Cookie: session=stolen\r\n\r\n"
        )
        await writer.drain()

    async with raw_server(reply) as port:
        resp = await upstream.request("GET", "127.0.0.1", port, "/", [])
        assert await resp.read() == b"ok"
        assert "Set-Cookie" not in resp.headers


async def test_a_connection_that_came_free_too_late_is_a_pool_timeout(aiohttp_server: AiohttpServer) -> None:
    # Waiting for a busy pool is not the upstream's fault: with too little of
    # the deadline left to answer in, the request is not sent at all.
    port, peers = await echo_server(aiohttp_server)
    upstream = Upstream(limit_per_host=1)
    loop = asyncio.get_running_loop()
    try:
        busy = await upstream.request("GET", "127.0.0.1", port, "/x", [])
        loop.call_later(0.25, busy.release)
        with pytest.raises(PoolTimeout):
            await upstream.request("GET", "127.0.0.1", port, "/slow", [], deadline=loop.time() + 0.3)
        assert len(peers) == 1
    finally:
        upstream.close()


async def test_a_body_that_ends_with_the_connection_is_whole(upstream: Upstream) -> None:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nuntil the end")
        await writer.drain()

    async with raw_server(reply) as port:
        resp = await upstream.request("GET", "127.0.0.1", port, "/", [])
        assert await asyncio.wait_for(resp.read(), 5) == b"until the end"


def test_an_ipv6_instance_gets_a_valid_host_header() -> None:
    head = request_head("GET", "::1", 8000, "/todos", [("X-A", "b")], None)
    assert head == b"GET /todos HTTP/1.1\r\nHost: [::1]:8000\r\nX-A: b\r\n\r\n"
    assert b"\r\nHost: 10.0.0.7:8000\r\n" in request_head("GET", "10.0.0.7", 8000, "/", [], None)


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        # Read until the connection closes, then forwarded without its
        # Transfer-Encoding (hop-by-hop): gzip bytes, labelled as plain.
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n\x1f\x8b\x08\x00", "transfer coding", id="gzip"
        ),
        # The chunks undone, the gzip is still there.
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n4\r\n\x1f\x8b\x08\x00\r\n0\r\n\r\n",
            "transfer coding",
            id="gzip, chunked",
        ),
        # To a plain GET: the gateway proxies no upgrades.
        pytest.param(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            "101",
            id="101",
        ),
        # Not interim, not HTTP: skipped as a 1xx, 099 would have its body join the answer.
        pytest.param(
            b"HTTP/1.1 099 X\r\nContent-Length: 4\r\n\r\nevilHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            "below 100",
            id="099",
        ),
        pytest.param(b"HTTP/1.1 000 X\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", "below 100", id="000"),
        # No status code above 599 is defined (RFC 9110, 15): aiohttp would send it on as it came.
        pytest.param(b"HTTP/1.1 999 X\r\nContent-Length: 0\r\n\r\n", "above 599", id="999"),
        # Latin-1: aiohttp writes headers as UTF-8 only, and its C writer
        # would quietly drop the byte it cannot (X-A: caf).
        pytest.param(b"HTTP/1.1 200 OK\r\nX-A: caf\xe9\r\nContent-Length: 2\r\n\r\nok", "not UTF-8", id="latin-1"),
    ],
)
async def test_an_answer_the_gateway_cannot_pass_on_as_it_came_is_broken(
    upstream: Upstream, answer: bytes, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(answer)
        await writer.drain()

    async with raw_server(reply) as port:
        with pytest.raises(UpstreamBroken, match=reason):  # a 502, at the head: not a byte of it goes on
            await upstream.request("GET", "127.0.0.1", port, "/", [])
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # refused, not crashed on


async def test_a_204_that_announces_a_body_leaves_its_connection_unused(upstream: Upstream) -> None:
    # A 204 ends at its head. This one says a body follows, and sends it once
    # the next request has come on the same connection: reused, the
    # connection would take that body for the next request's answer.
    late = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"
    answered = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        owed = b""
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                answered += 1
                if answered == 1:
                    writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: %d\r\n\r\n" % len(late))
                    owed = late
                else:
                    writer.write(owed + b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
                    owed = b""
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async with await asyncio.start_server(handle, "127.0.0.1", 0) as server:
        port = int(server.sockets[0].getsockname()[1])
        deleted = await upstream.request("DELETE", "127.0.0.1", port, "/", [])
        assert (deleted.status, await deleted.read()) == (204, b"")
        second = await upstream.request("GET", "127.0.0.1", port, "/", [])
        assert await asyncio.wait_for(second.read(), 5) == b"second"
        upstream.close()  # so that the handlers see the end
