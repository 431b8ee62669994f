"""The gateway's own upstream client, against real sockets: the HTTP it writes and reads.

Where an answer ends, what is skipped, and what is broken rather than passed
on. Well-behaved upstreams are aiohttp servers; misbehaving ones (cut bodies,
garbage, informational responses) are raw asyncio servers, because aiohttp
will not misbehave on request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
from pytest_aiohttp import AiohttpServer

from mesh_common.testing import eventually
from mesh_gateway.upstream import Upstream, UpstreamBroken, request_head

from .upstream_support import echo_server

Reply = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


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
        # Interim, but with a body, which llhttp reads for a 1xx other than
        # 100, 102 and 103: skipped with the head, it joined the real answer's.
        pytest.param(
            b"HTTP/1.1 150 X\r\nContent-Length: 5\r\n\r\nEVIL!HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            "interim 150",
            id="150 with a length",
        ),
        pytest.param(
            b"HTTP/1.1 199 X\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nEVIL!\r\n0\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            "interim 199",
            id="199 chunked",
        ),
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


async def test_a_body_still_coming_at_its_deadline_times_out_and_its_connection_goes(upstream: Upstream) -> None:
    answered = asyncio.Event()

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf ")
        await writer.drain()
        answered.set()
        await reader.read()  # holds the rest back until the client hangs up

    async with raw_server(reply) as port:
        loop = asyncio.get_running_loop()
        resp = await upstream.request("GET", "127.0.0.1", port, "/", [])
        await answered.wait()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(resp.read(deadline=started + 0.1), 5)
        assert loop.time() - started < 1  # its own deadline, not wait_for's bound
        # Half read, the connection cannot carry another answer: none is idle.
        assert all(not pool.idle for pool in upstream._pools.values())


async def whole_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One write, head and body: the body is in by the time the head is."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nwhole")
    await reader.read()


async def test_a_body_in_whole_is_read_without_a_timer(upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    # The deadline bounds a wait for the body, and one that came with its head needs none.
    async with raw_server(whole_answer) as port:
        loop = asyncio.get_running_loop()
        resp = await upstream.request("GET", "127.0.0.1", port, "/", [])
        with monkeypatch.context() as patched:
            patched.setattr(asyncio, "timeout_at", lambda _: pytest.fail("a timer for a body already in"))
            assert await resp.read(deadline=loop.time()) == b"whole"
        assert len(upstream._pools[("127.0.0.1", port)].idle) == 1  # read to its end: back in the pool
        upstream.close()  # so that the handler sees the end


async def test_a_body_in_whole_past_the_limit_is_broken_and_its_connection_goes(upstream: Upstream) -> None:
    async with raw_server(whole_answer) as port:
        resp = await upstream.request("GET", "127.0.0.1", port, "/", [])
        with pytest.raises(UpstreamBroken):
            await resp.read(limit=4)
        pool = upstream._pools[("127.0.0.1", port)]
        assert pool.unused  # closed, and its slot given back
