"""A TCP proxy that can freeze: what a paused or cut-off client looks like to its server."""

from __future__ import annotations

import asyncio


class FreezingProxy:
    """Forwards to a loopback port until ``freeze``; then forwards nothing, and closes nothing.

    What a process paused (SIGSTOP, a paused container) or cut off by a path
    that drops every packet looks like from the server: its connections are
    still there, and silent. The server has no reason to let go of what
    their sessions hold.
    """

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._closed = False
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self._relays: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def freeze(self) -> None:
        self._flowing.clear()

    async def close(self) -> None:
        self._closed = True
        self._flowing.set()  # the frozen pipes see the close, and end
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for writer in list(self._links):
            writer.transport.abort()
        # Ended, not left to the loop's close, which would cancel them and log it.
        await asyncio.gather(*self._relays, return_exceptions=True)

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if (task := asyncio.current_task()) is not None:
            self._relays.add(task)
            task.add_done_callback(self._relays.discard)
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self._target)
        except OSError:
            client_writer.transport.abort()
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
                await self._flowing.wait()  # frozen: held here, neither sent nor dropped
                if self._closed:
                    return
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.transport.abort()  # either side gone: so is the other
