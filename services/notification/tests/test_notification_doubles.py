"""The outage tests' doubles go down as a server does: their port refuses connections, and stays theirs.

A port let go while its double is down could be taken (by an outgoing
connection, as its ephemeral port), and the double could not come back on
it; a test of "refused" would reach whatever took it.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from notification_support import FakeUserService
from smtp_sink import SmtpSink

from mesh_common.testing import port_binds, refuses_connections
from mesh_common.testing.proxy import TcpProxy

Double = SmtpSink | FakeUserService | TcpProxy


DOUBLES = pytest.mark.parametrize(
    "make",
    [SmtpSink, lambda: FakeUserService("http://127.0.0.1:1", "never-registered"), lambda: TcpProxy(1)],
    ids=["smtp-sink", "user-service", "tcp-proxy"],
)


@DOUBLES
async def test_a_double_gone_down_refuses_connections_and_keeps_its_port(make: Callable[[], Double]) -> None:
    # Nothing connects while it is up: a connection the double closed first
    # would keep the port in TIME_WAIT, and the last check could not tell.
    double = make()
    go_down = double.cut if isinstance(double, TcpProxy) else double.stop
    try:
        await double.start()
        await go_down()
        assert await refuses_connections(double.port)
        assert not port_binds(double.port)
        await double.start()
        assert not port_binds(double.port, reuse=True)  # listening again
    finally:
        await double.close()
    assert port_binds(double.port)  # let go by close


@DOUBLES
async def test_a_double_never_started_lets_go_of_its_port_on_close(make: Callable[[], Double]) -> None:
    double = make()
    await double.close()
    assert port_binds(double.port)
