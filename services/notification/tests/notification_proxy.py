"""A TCP proxy in front of a real server, for outages that must not stop the shared one."""

from __future__ import annotations

import asyncio

from mesh_common.testing import HeldPort


class TcpProxy:
    """A TCP relay to a real server, which can be cut and restored.

    Cut, it has dropped every connection it carried and refuses new ones:
    what a PostgreSQL restart looks like to its clients, without stopping the
    PostgreSQL other suites share. It holds its port meanwhile, bound and not
    listening, so it comes back on it; ``close`` lets it go.
    """

    def __init__(self, target_port: int) -> None:
        self._held = HeldPort()
        self.port = self._held.port
        self._target = target_port
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, sock=self._held.take())

    async def cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        # At once, after the listening socket closed; one never started holds it still.
        self._held.hold_again()
        if server is not None:
            await server.wait_closed()
        for writer in list(self._links):
            writer.transport.abort()

    async def close(self) -> None:
        """``cut``, and let go of the port: the proxy's end, whether it ever started or not."""
        try:
            await self.cut()
        finally:
            self._held.close()

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self._target)
        except OSError:
            client_writer.transport.abort()
            return
        links = {client_writer, server_writer}
        self._links |= links
        try:
            await asyncio.gather(_pipe(client_reader, server_writer), _pipe(server_reader, client_writer))
        finally:
            self._links -= links
            for writer in links:
                writer.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.transport.abort()  # either side gone: so is the other
