"""The outage tests' doubles go down as a server does: their port refuses connections, and stays theirs.

A port let go while its double is down could be taken (by an outgoing
connection, as its ephemeral port), and the double could not come back on
it; a test of "refused" would reach whatever took it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import pytest
from notification_proxy import TcpProxy
from notification_support import FakeUserService
from smtp_sink import SmtpSink

Double = SmtpSink | FakeUserService | TcpProxy


def binds(port: int, *, reuse: bool = False) -> bool:
    # Linux binds a socket with SO_REUSEADDR beside one bound with it too,
    # unless that one listens; one without it, beside none.
    with socket.socket() as other:
        if reuse:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            other.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


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
        assert await refused(double.port)
        assert not binds(double.port)
        await double.start()
        assert not binds(double.port, reuse=True)  # listening again
    finally:
        await double.close()
    assert binds(double.port)  # let go by close


@DOUBLES
async def test_a_double_never_started_lets_go_of_its_port_on_close(make: Callable[[], Double]) -> None:
    double = make()
    await double.close()
    assert binds(double.port)
