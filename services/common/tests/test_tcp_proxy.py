"""The test proxy's cut drops every connection, one still being made to the server included."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mesh_common.testing.proxy import TcpProxy


async def test_a_connection_the_proxy_was_still_making_when_cut_is_dropped_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            writer.write(data)
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    target = server.sockets[0].getsockname()[1]
    connect = asyncio.open_connection
    reaching = asyncio.Event()
    held = asyncio.Event()

    async def slow_to_the_server(host: str, port: int, **kwargs: Any) -> Any:
        if port == target:  # the proxy's leg, held until the cut has begun
            reaching.set()
            await held.wait()
        return await connect(host, port, **kwargs)

    monkeypatch.setattr(asyncio, "open_connection", slow_to_the_server)
    proxy = TcpProxy(target)
    try:
        await proxy.start()
        reader, writer = await connect("127.0.0.1", proxy.port)
        async with asyncio.timeout(5):
            await reaching.wait()
        cutting = asyncio.create_task(proxy.cut())
        await asyncio.sleep(0)  # the cut has aborted what it knew of: not this one
        held.set()
        async with asyncio.timeout(5):  # it used to wait for the connection to end: forever
            await cutting
            writer.write(b"still there?")
            assert await reader.read(1024) == b""  # dropped, not relayed
        writer.close()
    finally:
        held.set()
        await proxy.close()
        server.close()
        await server.wait_closed()


async def test_a_cut_with_connections_open_returns() -> None:
    # From Python 3.12.1 on, a server's wait_closed also waits for the
    # connections it accepted: the cut must have ended them first.
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            writer.write(data)
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    proxy = TcpProxy(server.sockets[0].getsockname()[1])
    try:
        await proxy.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"open")
        assert await reader.read(1024) == b"open"
        async with asyncio.timeout(5):
            await proxy.cut()
            assert await reader.read(1024) == b""
        writer.close()
    finally:
        await proxy.close()
        server.close()
        await server.wait_closed()
