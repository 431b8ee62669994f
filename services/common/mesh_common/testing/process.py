"""A service as a real process, ``python -m <package>``, with its JSON log read as it comes.

For the tests that must kill a service outright (SIGKILL: nothing of it runs
after, no rollback of its own, no goodbye to Consul), which an in-process
test server cannot show.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from typing import Any

import consul.aio


class ServiceProcess:
    """``python -m module`` with ``env`` (which should set LOG_FORMAT=json)."""

    def __init__(self, module: str, env: dict[str, str]) -> None:
        self._module = module
        self._env = env
        self.log: list[dict[str, Any]] = []
        # Lines that are not JSON: kept, not fatal to the reader, so that the
        # pipe is still drained (a service blocked writing to it would stall),
        # and the test can fail on them with the lines in hand.
        self.not_json: list[bytes] = []
        self._logged = asyncio.Condition()
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", self._module, env=self._env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            limit=1 << 20,  # a line longer than the 64 KiB default would end the reader
        )  # fmt: skip
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        async for line in self.process.stderr:
            try:
                entry = json.loads(line)
            except ValueError:
                self.not_json.append(line)
                continue
            async with self._logged:
                self.log.append(entry)
                self._logged.notify_all()

    def logged(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        """The entries logged so far as ``event``, with ``fields`` among theirs."""
        return [e for e in self.log if e.get("event") == event and fields.items() <= e.items()]

    async def first(self, event: str, within: float = 30.0) -> dict[str, Any]:
        """The first entry logged as ``event``, waiting for it up to ``within`` seconds."""
        async with asyncio.timeout(within), self._logged:
            await self._logged.wait_for(lambda: bool(self.logged(event)))
        return self.logged(event)[0]

    async def url(self) -> str:
        host, port = (await self.first("serving"))["address"]
        return f"http://{host}:{port}"

    async def wait(self, within: float = 30.0) -> int:
        """Its exit code, once it has ended and its log has been read to the end."""
        assert self.process is not None and self._reader is not None
        async with asyncio.timeout(within):
            code = await self.process.wait()
            await self._reader
        return code

    async def kill(self) -> int | None:
        """SIGKILL, and its exit code; None if it never started or had ended (so it can go in a finally)."""
        if self.process is None or self.process.returncode is not None:
            return None
        self.process.kill()
        return await self.wait(within=10)

    async def stop(self) -> int | None:
        """SIGTERM, and its exit code; killed if it overruns 20 s (and TimeoutError). None if not running."""
        if self.process is None or self.process.returncode is not None:
            return None
        self.process.send_signal(signal.SIGTERM)
        try:
            return await self.wait(within=20)
        except TimeoutError:
            await self.kill()  # never left running: it would take later tests' work
            raise

    async def leave_consul(self, client: consul.aio.Consul) -> None:
        """Deregister what it registered and did not deregister itself (killed); Consul's reaper would, later."""
        gone = {e["service_id"] for e in self.logged("consul_deregistered")}
        for service_id in {e["service_id"] for e in self.logged("consul_registered")} - gone:
            await client.agent.service.deregister(service_id)
