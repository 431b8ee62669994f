"""Fixtures shared by every test suite: the real parts of the native stack.

Tests talk to real PostgreSQL, Redis, RabbitMQ, Consul and an SMTP server,
started from Debian's packages and our pinned Consul by the same code as
``task up`` (scripts/devstack), on the test profile's own ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))

from devstack import rabbitmq, sessions
from devstack.config import StackConfig
from devstack.procs import StackError
from mesh_common.testing.database import MigratedDatabase, migrate_test_database


@pytest.fixture(scope="session")
def stack_config() -> StackConfig:
    return StackConfig.from_env(profile="test")


@pytest.fixture(scope="session")
def infra(stack_config: StackConfig) -> Iterator[StackConfig]:
    """PostgreSQL, Redis, RabbitMQ, Consul and the SMTP sink, running.

    Idempotent: parts already running are left as they are. ``task test``
    stops them all at the end of the run, unless another test run waits to
    use them: runs take turns, as they share the data (see devstack.sessions).
    """
    with sessions.session(stack_config):
        yield stack_config


@pytest.hookimpl(wrapper=True)
def pytest_runtestloop(session: pytest.Session) -> Generator[None, object, object]:
    """The test stack's turn, taken before the first test, if any test uses it, and held to the last.

    Not in ``infra`` (whose session re-enters it): a wait there for another
    run's turn (7 minutes or more) would count towards the first test's
    timeout, and pytest-timeout would fail it at 300 s, and every test after
    it that uses the stack.
    """
    if session.config.option.collectonly or not any(
        "infra" in getattr(item, "fixturenames", ()) for item in session.items
    ):
        return (yield)
    with contextlib.ExitStack() as turn:
        try:
            turn.enter_context(sessions.turn(StackConfig.from_env(profile="test")))
        except StackError as exc:  # another run's turn, the wait's bound reached (lock.Busy)
            pytest.exit(f"test stack: {exc}", returncode=pytest.ExitCode.INTERRUPTED)
        return (yield)


@pytest.fixture(scope="session")
def amqp_vhost(infra: StackConfig) -> Callable[[str], str]:
    """The broker URL of a RabbitMQ virtual host of a suite's own, made if need be.

    A suite whose app publishes events uses one, so that they never reach
    the queues of the default one: the notification-service's, which
    nothing consumes during the suites, and which the end-to-end tests'
    notification-service would then work through first.
    """

    return lambda name: rabbitmq.vhost(infra, name)


# How long the broker may take to raise or clear a resource alarm.
ALARM_BOUND = 60.0
DiskAlarm = Callable[[], contextlib.AbstractAsyncContextManager[None]]


@pytest.fixture
def disk_alarm(infra: StackConfig) -> DiskAlarm:
    """``async with disk_alarm():`` the broker's disk alarm on for the block; its limit put back after.

    RabbitMQ blocks every connection that publishes while a memory or disk
    alarm is on, by no longer reading from it. The alarm is raised by
    setting ``disk_free_limit`` above the free space, and the limit is put
    back, and the alarm seen cleared, however the block ends.
    """

    def status() -> dict[str, object]:
        answer: dict[str, object] = json.loads(rabbitmq.rabbitmqctl(infra, "status", "--formatter", "json"))
        return answer

    async def alarms_are(*, on: bool) -> None:
        deadline = time.monotonic() + ALARM_BOUND
        while bool((await asyncio.to_thread(status))["alarms"]) != on:
            assert time.monotonic() < deadline, f"the broker's alarm never went {'on' if on else 'off'}"
            await asyncio.sleep(0.5)

    @contextlib.asynccontextmanager
    async def alarm() -> AsyncIterator[None]:
        before = await asyncio.to_thread(status)
        assert not before["alarms"], f"an alarm is on already: {before['alarms']}"
        limit = str(before["disk_free_limit"])
        try:
            above = str(10 * int(str(before["disk_free"])))
            await asyncio.to_thread(rabbitmq.rabbitmqctl, infra, "set_disk_free_limit", above)
            await alarms_are(on=True)
            yield
        finally:
            await asyncio.to_thread(rabbitmq.rabbitmqctl, infra, "set_disk_free_limit", limit)
            await alarms_are(on=False)

    return alarm


@pytest.fixture(scope="session")
def migrated_database(infra: StackConfig, pytestconfig: pytest.Config) -> MigratedDatabase:
    """``await migrated_database(service, migrations)``: the URL of a service's test database, migrated.

    One whose applied migrations were edited since (or a branch switched) is
    dropped and made again, and the terminal says so: see mesh_common.testing.database.
    """
    # The test stack's superuser: initdb's, trusted on loopback (devstack.infra).
    admin_url = f"postgresql://postgres@127.0.0.1:{infra.ports.postgres}/postgres"
    terminal = pytestconfig.pluginmanager.get_plugin("terminalreporter")

    async def migrated(service: str, migrations: Sequence[Path]) -> str:
        url = infra.database_url(service)
        if (remade := await migrate_test_database(url, migrations, admin_url=admin_url)) is not None:
            # Not warnings.warn: filterwarnings = error would fail the test that recovered.
            if terminal is not None:
                terminal.write_line(f"warning: {remade}", yellow=True)
            else:
                print(f"warning: {remade}", file=sys.stderr)
        return url

    return migrated
