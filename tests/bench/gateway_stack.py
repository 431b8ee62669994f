"""The processes bench_gateway.py measures, beside the test stack's infrastructure.

A user- and a todo-service, the echo service (echo_service.py), the full
gateway with the bench's limits, a pass-through gateway (GATEWAY_PASSTHROUGH)
on a port of its own, and Envoy, its shield's buckets raised likewise; each registered in Consul as it would be in
the stack, and waited for until its check passes.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from devstack import mesh, stack  # noqa: E402
from devstack.config import StackConfig  # noqa: E402
from devstack.ports import port_free  # noqa: E402
from devstack.procs import Proc, start, stop, wait_until  # noqa: E402

PASSTHROUGH_PORT = 18090
# The limits would (rightly) throttle a benchmark: raise them, keep the work.
UNLIMITED = 10**9
BENCH_ENV = {
    "GATEWAY_EXTRA_ROUTES": "/api/v1/echo=bench-echo",
    "RATE_LIMIT_PER_IP": str(UNLIMITED),
    "RATE_LIMIT_PER_USER": str(UNLIMITED),
    "LOG_FORMAT": "json",
}


def unthrottled_edge(config: dict[str, Any]) -> None:
    """Envoy's coarse shield with buckets no benchmark empties: every bucket is still taken from.

    Each client's bucket, 5,000 requests a second, is above what the whole
    mesh served on the 2-vCPU machines the bench was first run on, but a
    faster host drives more than that from wrk's one address, and the bench
    would measure the shield's refusals instead of the mesh.
    """
    (listener,) = config["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (manager,) = chain["filters"]
    (limit,) = (f["typed_config"] for f in manager["typed_config"]["http_filters"] if "local_ratelimit" in f["name"])
    for bucket in [limit["token_bucket"], *(d["token_bucket"] for d in limit["descriptors"])]:
        bucket.update(max_tokens=UNLIMITED, tokens_per_fill=UNLIMITED)


def start_bench_processes(cfg: StackConfig) -> None:
    for svc in ("user", "todo"):
        stack.scale(cfg, svc, 1)
    start(
        cfg.run_dir,
        Proc("bench-echo", [cfg.python, str(ROOT / "tests/bench/echo_service.py")], env=cfg.service_env("echo")),
    )
    gateway = mesh.gateway(cfg, 0)
    # replace(), not a Proc of our own: it keeps what the stack's gateway has
    # beside its command (its settings, which the shell must not set).
    start(cfg.run_dir, replace(gateway, env={**gateway.env, **BENCH_ENV}))
    if not port_free("127.0.0.1", PASSTHROUGH_PORT):
        raise SystemExit(f"port {PASSTHROUGH_PORT} is taken")
    passthrough_env = {
        **gateway.env,
        **BENCH_ENV,
        "SERVICE_HOST": "127.0.0.1",
        "SERVICE_PORT": str(PASSTHROUGH_PORT),
        "GATEWAY_SERVICE_NAME": "gateway-passthrough",
        "GATEWAY_PASSTHROUGH": "1",
    }
    start(cfg.run_dir, replace(gateway, name="bench-passthrough", env=passthrough_env))
    start(cfg.run_dir, mesh.envoy(cfg, edit=unthrottled_edge))
    for name in ("bench-echo", "gateway", "gateway-passthrough", "user-service", "todo-service"):
        wait_until(functools.partial(stack.passing, cfg, name), timeout=60, what=f"{name} to pass its check")
    wait_until(lambda: stack.get_json(f"{cfg.api_url}/.well-known/jwks.json"), timeout=60, what="Envoy")


def stop_bench_processes(cfg: StackConfig) -> None:
    for name in ("envoy", "bench-passthrough", "bench-echo"):
        stop(cfg.run_dir, name)
    for svc in ("gateway", "user", "todo"):
        stack.scale(cfg, svc, 0, wait=False)


def instance_url(cfg: StackConfig, consul_name: str) -> str:
    entry = stack.passing(cfg, consul_name)[0]["Service"]
    return f"http://{entry['Address']}:{entry['Port']}"
