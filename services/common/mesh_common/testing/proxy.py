"""A TCP proxy in front of a real server, for outages that must not touch the one other suites share."""

from __future__ import annotations

import asyncio
import functools

from . import HeldPort


class TcpProxy:
    """A TCP relay to a loopback port, which can be cut and restored, or frozen.

    ``cut`` is what a server restart looks like to its clients: every
    connection dropped, new ones refused. The proxy holds its port meanwhile,
    bound and not listening, so ``start`` brings it back on the same one.

    ``freeze`` is what a client paused (SIGSTOP, a paused container) or cut
    off by a path that drops every packet looks like to the server: its
    connections are still there, and silent, so the server has no reason to
    let go of what their sessions hold. Bytes are held, neither sent nor
    dropped, until ``cut`` or ``close`` ends the connections that carried them.

    ``close`` cuts, and lets go of the port, whether the proxy ever started or not.
    """

    def __init__(self, target_port: int) -> None:
        self._held = HeldPort()
        self.port = self._held.port
        self._target = target_port
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._links: set[asyncio.StreamWriter] = set()
        self._relays: set[asyncio.Task[None]] = set()
        self._cuts = 0

    async def start(self) -> None:
        self._flowing.set()
        # Each connection knows the cuts before its server started: one
        # accepted by a server cut since is dropped, however late it runs.
        relay = functools.partial(self._relay, self._cuts)
        self._server = await asyncio.start_server(relay, sock=self._held.take())

    def freeze(self) -> None:
        self._flowing.clear()

    async def cut(self) -> None:
        self._cuts += 1
        server, self._server = self._server, None
        if server is not None:
            server.close()
        # At once, after the listening socket closed; one never started holds it still.
        self._held.hold_again()
        for writer in list(self._links):
            writer.transport.abort()
        self._flowing.set()  # frozen pipes wake to find their connections gone
        # Ended here, not left to the loop's close, which would cancel them and log it.
        await asyncio.gather(*self._relays, return_exceptions=True)
        if server is not None:
            # Last: from Python 3.12.1 on it also waits for every connection
            # the server accepted to close, which the aborts above did.
            await server.wait_closed()

    async def close(self) -> None:
        try:
            await self.cut()
        finally:
            self._held.close()

    async def _relay(self, cuts: int, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if (task := asyncio.current_task()) is not None:
            self._relays.add(task)
            task.add_done_callback(self._relays.discard)
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self._target)
        except OSError:
            client_writer.transport.abort()
            return
        if self._cuts != cuts:  # cut since it was accepted, after the cut aborted what it knew of
            client_writer.transport.abort()
            server_writer.transport.abort()
            return
        links = {client_writer, server_writer}
        self._links |= links
        try:
            await asyncio.gather(self._pipe(client_reader, server_writer), self._pipe(server_reader, client_writer))
        finally:
            self._links -= links
            for writer in links:
                writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()
                if writer.is_closing():  # cut while frozen: the bytes held go nowhere
                    return
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.transport.abort()  # either side gone: so is the other
