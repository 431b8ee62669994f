"""The breaker board's rules, call by call: what a success, a failure and a non-answer prove."""

from __future__ import annotations

import asyncio
import contextlib

import circuitbreaker
import pytest

from mesh_common.discovery import Instance, ServiceWatch
from mesh_common.http import SERVICE_CLIENT
from mesh_common.resilience import AllBreakersOpen, BreakerBoard, UpstreamFailure
from mesh_common.settings import SettingsError
from mesh_common.testing import eventually
from mesh_gateway.keys import BREAKERS
from mesh_gateway.settings import Settings


def watch_of(*ids: str) -> ServiceWatch:
    # A watch that is never started: its instances are set by hand.
    watch = ServiceWatch(None, "svc")
    watch.instances = tuple(Instance(i, "127.0.0.1", 1) for i in ids)
    return watch


def fail(board: BreakerBoard, instance_id: str, times: int = 1) -> None:
    for _ in range(times):
        with contextlib.suppress(UpstreamFailure), board.breaker(instance_id):
            raise UpstreamFailure("boom")


async def half_open(board: BreakerBoard, instance_id: str) -> None:
    await eventually(lambda: board.state(instance_id) == "half_open")


def test_a_call_that_began_before_the_breaker_opened_does_not_close_it():
    board = BreakerBoard(failure_threshold=2)
    slow = board.breaker("a")
    with slow:  # a slow call, in flight while the instance starts failing
        fail(board, "a", 2)
        assert board.is_open("a")
    # It succeeded (or answered 404), but it began before the failures: still open.
    assert board.is_open("a")
    assert board.failures("a") == 2


@pytest.mark.parametrize("gone", [ConnectionResetError, asyncio.CancelledError])
def test_a_call_cut_on_our_side_neither_counts_nor_resets(gone):
    board = BreakerBoard(failure_threshold=3)
    fail(board, "a", 2)
    with pytest.raises(gone), board.breaker("a"):
        raise gone()
    assert board.failures("a") == 2  # not reset: one more failure opens it
    fail(board, "a")
    assert board.is_open("a")


async def test_half_open_lets_one_probe_through_at_a_time():
    board = BreakerBoard(failure_threshold=1, recovery_timeout=0.05)
    watch = watch_of("sick")
    fail(board, "sick")
    await half_open(board, "sick")
    probe = board.breaker(board.pick(watch).id)
    with probe:
        # While the probe is out, the instance takes nothing more.
        for _ in range(10):
            with pytest.raises(AllBreakersOpen):
                board.pick(watch)
        assert board.retry_after(watch) == 1
    assert board.state("sick") == "closed"  # the probe succeeded
    assert board.pick(watch).id == "sick"


async def test_a_settled_probe_closes_the_breaker_and_a_later_failure_still_counts():
    board = BreakerBoard(failure_threshold=2, recovery_timeout=0.05)
    watch = watch_of("sick")
    fail(board, "sick")
    fail(board, "sick")
    await half_open(board, "sick")
    with contextlib.suppress(UpstreamFailure), board.breaker(board.pick(watch).id) as probe:
        probe.settle()  # its head came back well; the body is still on its way
        assert board.state("sick") == "closed"
        assert board.pick(watch).id == "sick"
        raise UpstreamFailure("the stream broke")
    assert board.state("sick") == "closed"
    assert board.failures("sick") == 1  # counted, against the closed breaker


async def test_concurrent_traffic_goes_elsewhere_while_the_probe_is_out():
    board = BreakerBoard(failure_threshold=1, recovery_timeout=0.05)
    watch = watch_of("sick", "well")
    fail(board, "sick")
    await half_open(board, "sick")
    with board.breaker("sick"):
        assert {board.pick(watch).id for _ in range(50)} == {"well"}


def test_a_probe_that_fails_opens_the_breaker_again(monkeypatch):
    # On circuitbreaker's clock, which the test moves: with a real 50 ms
    # recovery, a stall of the machine between the failure and the check
    # would find the breaker half-open again.
    clock = Clock()
    monkeypatch.setattr(circuitbreaker, "monotonic", clock)
    board = BreakerBoard(failure_threshold=1, recovery_timeout=5)
    fail(board, "sick")
    clock.now += 5.1
    assert board.state("sick") == "half_open"
    fail(board, "sick")
    assert board.is_open("sick")


@pytest.mark.parametrize("gone", [ConnectionResetError, asyncio.CancelledError])
async def test_a_probe_cut_on_our_side_frees_the_slot_for_the_next(gone):
    board = BreakerBoard(failure_threshold=1, recovery_timeout=0.05)
    watch = watch_of("sick")
    fail(board, "sick")
    await half_open(board, "sick")
    with pytest.raises(gone), board.breaker(board.pick(watch).id):
        raise gone()
    assert board.state("sick") == "half_open"  # neither closed nor opened again
    assert board.pick(watch).id == "sick"  # and the next call may probe


async def test_only_the_probe_closes_a_half_open_breaker():
    board = BreakerBoard(failure_threshold=1, recovery_timeout=0.05)
    stale = board.breaker("sick")
    with stale:  # began while closed, ends after the breaker half-opened
        fail(board, "sick")
        await half_open(board, "sick")
    assert board.state("sick") == "half_open"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_instances_that_failed_and_left_are_forgotten_and_pruning_stays_cheap(monkeypatch):
    clock = Clock()
    board = BreakerBoard(clock=clock)
    for n in range(2 * BreakerBoard.PRUNE_AT):  # each failed once, then left Consul for good
        fail(board, f"gone-{n}")
    prunes = 0
    prune = board._prune

    def counted() -> None:
        nonlocal prunes
        prunes += 1
        prune()

    monkeypatch.setattr(board, "_prune", counted)
    for n in range(1000):  # healthy instances come and go meanwhile
        with board.breaker(f"healthy-{n}"):
            pass
    assert prunes <= 10  # not one a call: it waits until the board has doubled

    clock.now += BreakerBoard.FORGET_AFTER + 1
    for n in range(BreakerBoard.PRUNE_AT):
        with board.breaker(f"later-{n}"):
            pass
    assert board.size <= 2 * BreakerBoard.PRUNE_AT
    assert board.failures("gone-0") == 0  # forgotten


def test_a_breaker_with_a_call_in_flight_is_never_forgotten():
    board = BreakerBoard(failure_threshold=5, clock=Clock())
    for n in range(BreakerBoard.PRUNE_AT):  # enough failed instances to make every new one prune
        fail(board, f"gone-{n}")
    for round_ in range(5):
        # A's call is under way (its breaker still clean) when another
        # request meets a new instance and the board prunes.
        with contextlib.suppress(UpstreamFailure), board.breaker("a"):
            for m in range(2 * BreakerBoard.PRUNE_AT):
                with board.breaker(f"new-{round_}-{m}"):
                    pass
            raise UpstreamFailure("a fails")
    assert board.is_open("a")  # every failure counted on the breaker the board holds


def test_the_breaker_board_forgets_breakers_that_hold_no_state():
    board = BreakerBoard(failure_threshold=1)
    with contextlib.suppress(UpstreamFailure), board.breaker("failing"):
        raise UpstreamFailure("boom")
    for n in range(3 * BreakerBoard.PRUNE_AT):  # instances come and go
        with board.breaker(f"instance-{n}"):
            pass
    assert board.size <= BreakerBoard.PRUNE_AT
    assert board.is_open("failing")


@pytest.mark.parametrize("settings", [{"failure_threshold": 0}, {"recovery_timeout": 0}, {"recovery_timeout": -1}])
def test_a_breaker_setting_of_zero_is_refused(settings):
    # circuitbreaker would read 0 as its own default: 5 failures, 30 s open.
    with pytest.raises(ValueError):
        BreakerBoard(**settings)
    env = {"REDIS_URL": "redis://127.0.0.1:1/0", "GATEWAY_BREAKER_RECOVERY": "0"}
    with pytest.raises(SettingsError, match="GATEWAY_BREAKER_RECOVERY"):
        Settings.from_env(env)


async def test_the_gateways_own_calls_share_the_proxys_breakers(fake_service, gateway):
    # The JWKS fetch: one view of each user-service instance, with the
    # gateway's breaker settings, and listed by /ready.
    client = await gateway(await fake_service(1))
    assert client.app[SERVICE_CLIENT].breakers is client.app[BREAKERS]
