"""Does a login storm slow everyone else down? p99 of GET /users/me, calm vs storm.

    python tests/bench/bench_login_storm.py

Starts the test profile's infrastructure if needed (like the test suite),
runs one user-service process on a loopback port, outside Consul, and
measures from this process:

1. calm:  GET /users/me at READ_RATE per second;
2. storm: the same, while STORMERS clients log in back to back (argon2id with
   the production parameters, every one a correct password), from a second
   process so that they do not share the reads' event loop;

in ROUNDS alternating slices of SLICE seconds each.

The reads come at a fixed rate rather than back to back, so that the calm
phase is a realistic load and not a saturated CPU, and latencies count from
when each request was due (no coordinated omission).

It prints both p99s and their ratio; the target is a ratio of at most 2.
A storm that is mostly 503s is no storm: logins shed before they hash cost
next to nothing (Redis down answers 503 before any hashing too), so the run
fails unless each storm slice had enough logins answered 200.
Bounded: about 40 seconds in all, loopback only. The bench's accounts are
deleted at the end.
"""

from __future__ import annotations

import asyncio
import os
import select
import statistics
import subprocess
import sys
import uuid
from pathlib import Path

import aiohttp
import aiopg

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from devstack.config import StackConfig  # noqa: E402
from devstack.stack import up_infra  # noqa: E402

READ_RATE = 200  # GET /users/me per second, in both phases
STORMERS = 32  # clients logging in back to back during the storm
STORM_ACCOUNTS = 16
ROUNDS = 10
SLICE = 1.5  # seconds per calm or storm slice
TARGET_RATIO = 2.0  # storm p99 / calm p99 at most
# A storm is ~60 logins/s from 32 clients here (docs/services/user.md). Each
# storm slice must have at least half of its answers 200, and a quarter of
# that rate: below either, the storm measured was mostly cheap 503s.
EXPECTED_LOGINS_PER_SECOND = 60
MIN_LOGIN_SHARE = 0.5
MIN_LOGINS_PER_SLICE = int(EXPECTED_LOGINS_PER_SECOND * SLICE / 4)
PASSWORD = "bench passphrase that is long enough"
PREFIX = "bench_"


def serve() -> None:
    """The child process: a user-service on an ephemeral port, announced on stdout."""
    from mesh_common.logs import configure_logging
    from mesh_common.serve import bind_socket, run
    from user_service.app import create_app
    from user_service.settings import Settings

    settings = Settings.from_env(os.environ)
    configure_logging("json", level=30)  # warnings only: access lines would cost CPU
    sock = bind_socket("127.0.0.1", 0)
    print(sock.getsockname()[1], flush=True)
    run(create_app(settings.with_port(sock.getsockname()[1]), register=False), sock)


def start_service(config: StackConfig) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, **config.service_env("user"), "REDIS_PREFIX": f"{PREFIX}{uuid.uuid4().hex[:8]}:"}
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert child.stdout is not None
    # The port is printed before the app is even built: 30 s is a hung child.
    announced, _, _ = select.select([child.stdout], [], [], 30)
    port = child.stdout.readline().strip() if announced else ""
    if not port.isdigit():
        child.kill()
        child.wait()
        raise SystemExit("the user-service did not start")
    return child, f"http://127.0.0.1:{port}"


async def wait_ready(session: aiohttp.ClientSession) -> None:
    async with asyncio.timeout(20):
        while True:
            try:
                async with session.get("/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)


async def account(session: aiohttp.ClientSession) -> tuple[str, str]:
    """A new account: (username, access token)."""
    name = f"{PREFIX}{uuid.uuid4().hex[:12]}"
    body = {"username": name, "email": f"{name}@example.test", "password": PASSWORD}
    async with session.post("/users", json=body) as response:
        assert response.status == 201, await response.text()
    async with session.post("/auth/login", json={"username": name, "password": PASSWORD}) as response:
        assert response.status == 200, await response.text()
        return name, (await response.json())["access_token"]


async def read_profiles(session: aiohttp.ClientSession, token: str, until: float, latencies: list[float]) -> None:
    """GET /users/me at a fixed rate, whatever the answers' speed (an open loop).

    Each latency counts from when the request was due, not from when it was
    sent: a stall delays the requests behind it, and they count it too.
    """
    headers = {"Authorization": f"Bearer {token}"}
    loop = asyncio.get_running_loop()

    async def one(due: float) -> None:
        async with session.get("/users/me", headers=headers) as response:
            body = await response.read()
            assert response.status == 200, (response.status, body[:200])
        latencies.append(loop.time() - due)

    requests = []
    due = loop.time()
    while due < until:
        await asyncio.sleep(max(0.0, due - loop.time()))
        requests.append(asyncio.create_task(one(due)))
        due += 1 / READ_RATE
    await asyncio.gather(*requests)


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
        self._args = [sys.executable, __file__, "--storm", base_url, ",".join(names)]

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


async def phase(
    session: aiohttp.ClientSession, token: str, storm: Storm | None = None, seconds: float = SLICE
) -> tuple[list[float], tuple[int, int]]:
    until = asyncio.get_running_loop().time() + seconds
    latencies: list[float] = []
    reads = read_profiles(session, token, until, latencies)
    async with asyncio.timeout(seconds + 30):  # a hung service fails the run rather than stalling it
        if storm is None:
            await reads
            return latencies, (0, 0)
        _, counts = await asyncio.gather(reads, storm.blow(seconds))
    return latencies, counts


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98] * 1000


async def bench(config: StackConfig, base_url: str) -> float:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(base_url, connector=connector) as session:
        await wait_ready(session)
        _, token = await account(session)
        storm_names = [name for name, _ in await asyncio.gather(*(account(session) for _ in range(STORM_ACCOUNTS)))]
        calm: list[float] = []
        storm: list[float] = []
        slices: list[tuple[int, int]] = []  # (logins answered 200, shed with a 503) per storm slice
        async with Storm(base_url, storm_names) as stormers:
            await phase(session, token, stormers, seconds=2.0)  # warm-up: connections, caches, pool threads
            # Alternate short slices, so that whatever else the machine is
            # doing meanwhile weighs on both sides alike.
            for _ in range(ROUNDS):
                calm += (await phase(session, token))[0]
                latencies, counts = await phase(session, token, stormers)
                storm += latencies
                slices.append(counts)
    ratio = p99(storm) / p99(calm)
    seconds = ROUNDS * SLICE
    logins, shed = sum(ok for ok, _ in slices), sum(no for _, no in slices)
    print(f"calm:  {len(calm)} GET /users/me in {seconds:.0f} s, p99 {p99(calm):.1f} ms")
    print(
        f"storm: {len(storm)} GET /users/me in {seconds:.0f} s, p99 {p99(storm):.1f} ms,"
        f" during {logins} logins ({shed} more shed with a 503: {shed / max(logins + shed, 1):.0%} of them)"
    )
    weak = [
        f"storm slice {n}: {ok} of {ok + no} logins answered 200"
        for n, (ok, no) in enumerate(slices, 1)
        if ok < MIN_LOGIN_SHARE * (ok + no) or ok < MIN_LOGINS_PER_SLICE
    ]
    verdict = "INVALID" if weak else "met" if ratio <= TARGET_RATIO else "NOT MET"
    print(f"p99 ratio storm/calm: {ratio:.2f} (target <= {TARGET_RATIO:.0f}: {verdict})")
    if weak:
        raise SystemExit(
            f"too few logins succeeded for a storm (each slice needs {MIN_LOGIN_SHARE:.0%} of its logins"
            f" answered 200, and {MIN_LOGINS_PER_SLICE} of them), so the ratio does not count:\n  " + "\n  ".join(weak)
        )
    return ratio


async def delete_bench_accounts(config: StackConfig) -> None:
    async with (
        aiopg.create_pool(config.database_url("user"), minsize=1, maxsize=1) as pool,
        pool.acquire() as conn,
        conn.cursor() as cur,
    ):
        await cur.execute("DELETE FROM users WHERE username LIKE %s", (f"{PREFIX}%",))


def main() -> None:
    config = StackConfig.from_env(profile="test")
    up_infra(config)
    child, base_url = start_service(config)
    try:
        asyncio.run(bench(config, base_url))
    finally:
        child.terminate()
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()  # a service that does not stop must not outlive the bench
            child.wait()
        asyncio.run(delete_bench_accounts(config))


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    elif sys.argv[1:2] == ["--storm"]:
        asyncio.run(storm_process(sys.argv[2], sys.argv[3].split(",")))
    else:
        main()
