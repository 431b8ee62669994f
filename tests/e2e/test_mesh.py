"""The mesh itself: registration, health-filtered discovery, random spread.

Runs on the native stack: Envoy finds the gateway through Consul DNS, the
gateway finds todo-service instances through a Consul blocking query and
picks one at random per request. The gateway reports which instance served
a request in ``X-Upstream-Instance`` (enabled on the dev and test stacks).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter

import aiohttp
import pytest

from devstack import stack
from devstack.config import StackConfig
from devstack.loopback import DIRECT
from devstack.procs import running, wait_until

from .conftest import register_and_login

pytestmark = pytest.mark.e2e
TODO_INSTANCES = 3
REQUESTS = 300


@pytest.fixture
def three_todos(mesh: StackConfig) -> dict[str, str]:
    """Three passing todo-service instances: process name -> Consul service ID.

    Read for each test: one of them kills an instance, and its replacement
    registers under another ID.
    """
    stack.scale(mesh, "todo", TODO_INSTANCES)
    ids = {name: stack.registered_id(mesh, name) for name in running(mesh.run_dir) if name.startswith("todo-")}
    assert len(ids) == TODO_INSTANCES and all(ids.values()), ids
    return {name: service_id for name, service_id in ids.items() if service_id}  # all of them, as asserted


async def spread(api: aiohttp.ClientSession, headers: dict[str, str], n: int) -> Counter[str]:
    """Send ``n`` GET /todos through Envoy; count the instance that served each."""
    served: Counter[str] = Counter()
    semaphore = asyncio.Semaphore(16)

    async def one() -> None:
        async with semaphore, api.get("/api/v1/todos", headers=headers) as r:
            assert r.status == 200, await r.text()
            served[r.headers["X-Upstream-Instance"]] += 1

    await asyncio.gather(*(one() for _ in range(n)))
    return served


def gateway_picks(cfg: StackConfig) -> set[str]:
    """The todo-service instances the gateway currently chooses from (its /ready)."""
    ready = stack.get_json(f"http://{cfg.gateway_address(0)}:{cfg.ports.gateway}/ready")
    assert isinstance(ready, dict)
    return {instance["id"] for instance in ready["upstreams"]["todo-service"]}


def consul_status(cfg: StackConfig, service_id: str) -> str | None:
    checks = stack.get_json(f"{cfg.consul_url}/v1/agent/checks")
    assert isinstance(checks, dict)
    for check in checks.values():
        if check["ServiceID"] == service_id:
            return str(check["Status"])
    return None


def test_consul_lists_three_passing_todo_instances(mesh: StackConfig, three_todos: dict[str, str]) -> None:
    passing = stack.passing(mesh, "todo-service")
    assert sorted(e["Service"]["ID"] for e in passing) == sorted(three_todos.values())


async def test_requests_spread_over_every_instance(api: aiohttp.ClientSession, three_todos: dict[str, str]) -> None:
    headers = await register_and_login(api)
    served = await spread(api, headers, REQUESTS)
    shares = {instance: count / REQUESTS for instance, count in served.items()}
    print(f"\nspread over {TODO_INSTANCES} instances: {shares}")
    assert set(served) == set(three_todos.values())
    assert all(0.20 <= share <= 0.47 for share in shares.values()), shares


async def test_killed_instance_gets_no_requests_once_critical(
    mesh: StackConfig, api: aiohttp.ClientSession, three_todos: dict[str, str]
) -> None:
    headers = await register_and_login(api)
    victim = sorted(three_todos)[0]
    victim_id = three_todos[victim]
    os.kill(running(mesh.run_dir)[victim], signal.SIGKILL)
    try:
        wait_until(lambda: consul_status(mesh, victim_id) == "critical", timeout=15, what="the check to turn critical")
        # What the gateway picks from, asked directly: a request sent to the dead
        # instance would be refused and retried elsewhere, so the answers alone
        # could not tell whether the gateway still picks it.
        wait_until(lambda: victim_id not in gateway_picks(mesh), timeout=5, what="the gateway to drop the instance")
        assert len(gateway_picks(mesh)) == TODO_INSTANCES - 1

        served = await spread(api, headers, 100)
        print(f"\nafter SIGKILL of {victim_id}: {dict(served)}")
        assert victim_id not in served
        assert sum(served.values()) == 100
    finally:
        stack.scale(mesh, "todo", TODO_INSTANCES)  # put it back for the tests after this one


def test_sigterm_deregisters_within_two_seconds(mesh: StackConfig, three_todos: dict[str, str]) -> None:
    stack.scale(mesh, "todo", TODO_INSTANCES)
    name = max(n for n in running(mesh.run_dir) if n.startswith("todo-"))
    service_id = stack.registered_id(mesh, name)
    # Without it, the wait below would see nothing registered and pass at once.
    assert service_id is not None, f"{name} logged no registration"
    started = time.monotonic()
    os.kill(running(mesh.run_dir)[name], signal.SIGTERM)
    wait_until(
        lambda: (
            service_id not in {e["Service"]["ID"] for e in stack.passing(mesh, "todo-service")}
            and consul_status(mesh, service_id) is None
        ),
        timeout=10,
        what="deregistration",
        interval=0.02,
    )
    took = time.monotonic() - started
    print(f"\nderegistered {took * 1000:.0f} ms after SIGTERM")
    assert took < 2.0


def test_consul_ui_answers_and_lists_the_services(mesh: StackConfig) -> None:
    with DIRECT.open(f"{mesh.consul_url}/ui/", timeout=5) as resp:
        page = resp.read().decode()
    assert resp.status == 200 and "consul-ui" in page.lower()
    services = stack.get_json(f"{mesh.consul_url}/v1/catalog/services")
    assert isinstance(services, dict)
    assert {"gateway", "user-service", "todo-service", "notification-service"} <= set(services)


async def test_a_wrong_method_through_the_edge_is_a_405_with_allow_not_a_call_to_sign_in(
    api: aiohttp.ClientSession,
) -> None:
    # Envoy, the gateway and the user-service each had their say first: the
    # gateway answered 401 for any method of a public path but its own.
    for method, path, allow in [
        ("GET", "/api/v1/auth/login", {"POST"}),
        ("POST", "/.well-known/jwks.json", {"GET", "HEAD"}),
    ]:
        async with api.request(method, path) as r:
            assert (r.status, r.content_type) == (405, "application/problem+json"), await r.text()
            assert {m.strip() for m in r.headers["Allow"].split(",")} == allow
    async with api.head("/.well-known/jwks.json") as r:
        assert r.status == 200
