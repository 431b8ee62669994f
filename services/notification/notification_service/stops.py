"""The workers' stops, begun together when shutdown starts."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web


class Stops:
    """Worker stops begun together when shutdown starts, each awaited by its own cleanup.

    aiohttp closes the listener, runs ``on_shutdown``, waits for requests in
    flight, and only then exits the cleanup contexts, one by one. Begun at
    ``on_shutdown``, the consumer's drain and the scheduler's last round
    overlap that wait and each other. One after the other, with an SMTP
    server that hangs, they took 20 s: past compose's grace period.
    """

    def __init__(self) -> None:
        self._stops: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {}
        self._running: dict[str, asyncio.Task[None]] = {}

    def add(self, name: str, stop: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._stops[name] = stop

    async def begin(self, app: web.Application) -> None:
        for name in self._stops:
            self._start(name)

    async def finish(self, name: str) -> None:
        await self._start(name)

    def _start(self, name: str) -> asyncio.Task[None]:
        if name not in self._running:
            self._running[name] = asyncio.create_task(self._stops[name](), name=f"stop-{name}")
        return self._running[name]
