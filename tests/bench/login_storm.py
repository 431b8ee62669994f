"""The login storm of bench_login_storm.py: STORMERS clients logging in back to back.

    python tests/bench/login_storm.py <base url> <name,name,...>

Runs as a process of its own, driven by the bench through stdin and stdout
(see ``Storm``). Every login has a correct password (PASSWORD), so each one
costs the service a full argon2id verification.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import aiohttp

STORMERS = 32  # clients logging in back to back during the storm
PASSWORD = "bench passphrase that is long enough"


async def log_in_repeatedly(session: aiohttp.ClientSession, name: str, until: float, statuses: list[int]) -> None:
    while asyncio.get_running_loop().time() < until:
        async with session.post("/auth/login", json={"username": name, "password": PASSWORD}) as response:
            body = await response.read()
            # 503: no hashing slot came free in PASSWORD_QUEUE_SECONDS, a login shed.
            assert response.status in (200, 503), (response.status, body[:200])
        statuses.append(response.status)


class Storm:
    """The logins, from a process of their own.

    Sharing this process's event loop, 32 clients' logins would delay the
    reads' own callbacks: the client's contention would be measured as the
    service's. The storm process gets its orders on stdin (a duration) and
    answers with how many logins it made, and how many were shed (503).
    """

    def __init__(self, base_url: str, names: list[str]) -> None:
        self._args = [sys.executable, __file__, base_url, ",".join(names)]

    async def __aenter__(self) -> Storm:
        self._child = await asyncio.create_subprocess_exec(
            *self._args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ}
        )
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        assert self._child.stdin is not None
        self._child.stdin.close()
        try:
            if exc_type is not None:
                raise TimeoutError  # no clean end to wait for: the bench failed
            async with asyncio.timeout(15):
                await self._child.wait()
        except TimeoutError:
            # Never leave it logging in against the stack.
            self._child.kill()
            await self._child.wait()

    async def blow(self, seconds: float) -> tuple[int, int]:
        assert self._child.stdin is not None and self._child.stdout is not None
        self._child.stdin.write(f"{seconds}\n".encode())
        await self._child.stdin.drain()
        async with asyncio.timeout(seconds + 30):
            answer = await self._child.stdout.readline()
        logins, _, shed = answer.decode().strip().partition(" ")
        if not (logins.isdigit() and shed.isdigit()):
            raise SystemExit("the storm process failed")
        return int(logins), int(shed)


async def storm_process(base_url: str, names: list[str]) -> None:
    """The child: on each line of stdin, STORMERS clients log in for that many seconds."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with aiohttp.ClientSession(base_url, connector=aiohttp.TCPConnector(limit=0)) as session:
        while line := await reader.readline():
            until = loop.time() + float(line)
            statuses: list[int] = []
            await asyncio.gather(
                *(log_in_repeatedly(session, names[n % len(names)], until, statuses) for n in range(STORMERS))
            )
            print(statuses.count(200), statuses.count(503), flush=True)


if __name__ == "__main__":
    asyncio.run(storm_process(sys.argv[1], sys.argv[2].split(",")))
