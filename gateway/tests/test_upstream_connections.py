"""The gateway's own upstream client, against real sockets: its connections.

Kept alive and reused, no more per host than the limit, paused while nobody
reads, closed once idle, and their pools forgotten once their address is. At a
deadline, it tells a request that was sent from one that never got a connection.
"""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from mesh_common.testing import eventually, refused_port
from mesh_gateway.upstream import HIGH_WATER, PoolTimeout, Upstream, UpstreamBroken, UpstreamConnectError

from .upstream_support import echo_server


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


async def test_a_refused_connection_was_never_sent(upstream: Upstream) -> None:
    with refused_port() as port, pytest.raises(UpstreamConnectError):
        await upstream.request("GET", "127.0.0.1", port, "/", [])


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
