"""Bring the native stack up and down, scale it, and report on it."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable, Iterable
from concurrent import futures
from typing import Any

from . import infra, lock, mesh, rabbitmq
from .config import CONSUL_NAMES, SERVICES, StackConfig, port_variable
from .loopback import get_json as get_json  # stack.get_json to the tests and benchmarks too
from .ports import as_running, listeners, port_free, record, require_free, require_recorded
from .procs import (
    Hopeless,
    Proc,
    StackError,
    log_path,
    running,
    say,
    start,
    started_as,
    stop,
    wait_until,
)

INFRA = ("consul", "postgres", "redis", "rabbitmq", "mailsink")
READY_TIMEOUT = 90.0

# What a service gets to stop, as compose's stop_grace_period: leave Consul
# (at most 5 s), drain, finish the requests in flight (at most 10 s), close.
STOP_GRACE = 20.0


def service_health(cfg: StackConfig, consul_name: str, query: str = "") -> list[dict[str, Any]]:
    """Consul's health entries for a service: one per instance, with its node, service and checks."""
    entries = get_json(f"{cfg.consul_url}/v1/health/service/{consul_name}{query}")
    assert isinstance(entries, list)
    return entries


def passing(cfg: StackConfig, consul_name: str) -> list[dict[str, Any]]:
    return service_health(cfg, consul_name, "?passing")


def health(cfg: StackConfig) -> dict[str, str]:
    """Every registered instance of our services, and its aggregate check status."""
    statuses = {}
    for name in ("gateway", *CONSUL_NAMES.values()):
        for entry in service_health(cfg, name):
            passing = all(check["Status"] == "passing" for check in entry["Checks"])
            statuses[entry["Service"]["ID"]] = "passing" if passing else "critical"
    return statuses


# -- infrastructure --------------------------------------------------------------
def keep_ports(cfg: StackConfig) -> None:
    """Record the ports of a stack that starts from nothing; on one that runs, refuse any others."""
    if running(cfg.run_dir):
        require_recorded(cfg.run_dir, cfg.ports)
    else:
        record(cfg.run_dir, cfg.ports)


def up_infra(cfg: StackConfig) -> None:
    """Start whatever infrastructure is not running yet, and wait for it."""
    keep_ports(cfg)
    have = running(cfg.run_dir)
    p = cfg.ports
    wanted = {
        "consul": {
            "consul http": p.consul_http,
            "consul dns": p.consul_dns,
            "consul serf lan": p.consul_serf_lan,
            "consul serf wan": p.consul_serf_wan,
            "consul server": p.consul_server,
        },
        "postgres": {"postgres": p.postgres},
        "redis": {"redis": p.redis},
        # The distribution port too: Debian's own rabbitmq-server holds 25672.
        "rabbitmq": {"amqp": p.amqp, "rabbitmq management": p.rabbitmq_management, "rabbitmq dist": p.rabbitmq_dist},
        "mailsink": {"smtp": p.smtp, "mail api": p.mail_api},
    }
    missing = [name for name in INFRA if name not in have]
    require_free({label: port for name in missing for label, port in wanted[name].items()})
    if "rabbitmq" in missing:
        rabbitmq.require_epmd_port(cfg)
    parts = {
        "consul": infra.consul,
        "postgres": infra.postgres,
        "redis": infra.redis,
        "rabbitmq": rabbitmq.server,
        "mailsink": infra.mailsink,
    }
    for name in missing:
        start(cfg.run_dir, parts[name](cfg))

    ready(cfg, "consul", lambda: get_json(f"{cfg.consul_url}/v1/status/leader"), "Consul")
    ready(cfg, "postgres", lambda: infra.postgres_ready(cfg), "PostgreSQL")
    infra.create_databases(cfg)
    ready(cfg, "redis", lambda: not port_free("127.0.0.1", p.redis), "Redis")
    ready(cfg, "mailsink", lambda: get_json(f"{cfg.mail_api_url}/api/v1/messages") is not None, "the SMTP sink")
    ready(cfg, "rabbitmq", lambda: rabbitmq.ready(cfg), "RabbitMQ", interval=1.0)


def ready(cfg: StackConfig, name: str, check: Callable[[], object], what: str, interval: float = 0.1) -> None:
    """Wait until ``check`` passes, or its process ``name`` exits, or the timeout; either way, name its log."""

    def still_running() -> object:
        # One that died at start (a bad config, a full disk) says so at
        # once, with its log, instead of after the whole timeout.
        if name not in running(cfg.run_dir):
            raise Hopeless(f"{name} exited; see {log_path(cfg.run_dir, name)}")
        return check()

    wait_until(still_running, timeout=READY_TIMEOUT, what=what, interval=interval, log=log_path(cfg.run_dir, name))


# -- services ----------------------------------------------------------------------
def instances(cfg: StackConfig, svc: str) -> list[int]:
    prefix = f"{svc}-"
    return sorted(
        int(name[len(prefix) :])
        for name in running(cfg.run_dir)
        if name.startswith(prefix) and name[len(prefix) :].isdigit()
    )


def wanted(cfg: StackConfig, svc: str) -> int:
    """How many instances of ``svc`` `up` runs: its count, if one was given; else as many as run, or the default.

    As many as run: up to the highest number running, so that one that
    crashed below it is started again.
    """
    have = instances(cfg, svc) if svc in cfg.counts_unset else []
    return max(have) + 1 if have else cfg.instances[svc]


def instance(cfg: StackConfig, svc: str, n: int) -> Proc:
    return mesh.gateway(cfg, n) if svc == "gateway" else mesh.service(cfg, svc, n)


def scale(
    cfg: StackConfig, svc: str, count: int, *, wait: bool = True, cancelled: threading.Event | None = None
) -> None:
    """Run exactly ``count`` instances of ``svc`` (a service or ``gateway``), on today's code.

    An instance left running from before an edit of its code or settings
    (a stack left up, a test run cut short) is started again, not reused:
    reused, it would serve, and pass tests with, the old code. Once
    ``cancelled`` is set, it starts no more and stops waiting (Hopeless).
    """
    for n in instances(cfg, svc):
        name = f"{svc}-{n}"
        if n >= count:
            stop(cfg.run_dir, name, grace=STOP_GRACE)
        elif started_as(cfg.run_dir, name) != instance(cfg, svc, n).fingerprint():
            say(f"{name} runs older code or settings: starting it again")
            stop(cfg.run_dir, name, grace=STOP_GRACE)
    current = instances(cfg, svc)
    for n in range(count):
        if n in current:
            continue
        if cancelled is not None and cancelled.is_set():
            raise Hopeless(f"{svc}: cancelled")
        if svc == "gateway" and not port_free(address := cfg.gateway_address(n), cfg.ports.gateway):
            raise StackError(
                f"port {cfg.ports.gateway} on {address} is already in use."
                f" Stop what holds it, or move ours: {port_variable('gateway')}=<port>"
            )
        start(cfg.run_dir, instance(cfg, svc, n))
    if wait:
        consul_name = "gateway" if svc == "gateway" else CONSUL_NAMES[svc]

        def healthy() -> bool:
            # An instance that exits will never pass: say so now, not after the timeout.
            if cancelled is not None and cancelled.is_set():
                raise Hopeless(f"{svc}: cancelled")
            alive = running(cfg.run_dir)
            for n in range(count):
                if f"{svc}-{n}" not in alive:
                    raise Hopeless(f"{svc}-{n} exited; see {log_path(cfg.run_dir, f'{svc}-{n}')}")
            # Each passing entry must be one of these instances, listening where
            # it registered: a killed one's entry passes until its next check fails.
            ours = listeners(alive[f"{svc}-{n}"] for n in range(count))
            entries = passing(cfg, consul_name)
            return len(entries) == count and all(
                (e["Service"]["Address"], e["Service"]["Port"]) in ours for e in entries
            )

        wait_until(
            healthy,
            timeout=READY_TIMEOUT,
            what=f"{count} passing {consul_name} instance(s) in Consul",
            log=log_path(cfg.run_dir, f"{svc}-*"),
        )


def current_envoy(cfg: StackConfig) -> Proc:
    """Envoy as ``up`` starts it, its config rendered; one running from another config is stopped.

    As with the instances (``scale``): kept, an Envoy started before an edit
    of envoy/envoy.native.yaml would serve the old routes and timeouts.
    """
    envoy = mesh.envoy(cfg)
    if "envoy" in running(cfg.run_dir) and started_as(cfg.run_dir, "envoy") != envoy.fingerprint():
        say("envoy runs an older config: starting it again")
        stop(cfg.run_dir, "envoy", grace=STOP_GRACE)
    return envoy


def up(cfg: StackConfig) -> None:
    up_infra(cfg)
    if "envoy" not in running(cfg.run_dir):
        require_free({"envoy": cfg.ports.envoy, "envoy admin": cfg.ports.envoy_admin})
    cfg.service_secret()  # once, before instances start in parallel
    counts = {svc: wanted(cfg, svc) for svc in (*SERVICES, "gateway")}  # read before any scale changes them
    # When one fails, or a signal stops `up`, the others stop waiting for health
    # at once, rather than for up to READY_TIMEOUT before the teardown can begin.
    cancelled = threading.Event()
    with futures.ThreadPoolExecutor() as pool:
        scaling: list[futures.Future[None]] = []
        try:
            # Inside the try: a signal between two submits cancels the first too.
            for svc, count in counts.items():
                scaling.append(pool.submit(scale, cfg, svc, count, cancelled=cancelled))
            done, _ = futures.wait(scaling, return_when=futures.FIRST_EXCEPTION)
            for one in done:
                one.result()  # raises the failure, if one ended the wait
        except BaseException:
            cancelled.set()
            if not all(one.done() for one in scaling):
                say("waiting for the instances still starting, so that they are stopped too ...")
            raise
    # Only now: an `up` that fails before this leaves a stack that was up
    # as it was, its Envoy included.
    envoy = current_envoy(cfg)
    if "envoy" not in running(cfg.run_dir):
        start(cfg.run_dir, envoy)
    ready(cfg, "envoy", lambda: get_json(f"{cfg.api_url}/.well-known/jwks.json") is not None, "the API through Envoy")


class InUse(StackError):
    """Other test sessions use the stack: a ``down`` that yields to them has left it running."""


def stop_mesh(cfg: StackConfig) -> list[str]:
    """Stop all but the infrastructure, in the reverse order of ``up``: Envoy, the gateways, the services."""
    have = running(cfg.run_dir)
    order = [
        "envoy",
        *sorted(n for n in have if n.startswith("gateway-")),
        *sorted(n for n in have if n.split("-")[0] in SERVICES),
        *sorted(set(have) - set(INFRA)),  # a benchmark's own, left by one killed
    ]
    stopped = []
    for name in dict.fromkeys(order):
        if name in have:
            stop(cfg.run_dir, name, grace=STOP_GRACE)
            stopped.append(name)
    return stopped


def down(cfg: StackConfig, *, unless_in_use: bool = False) -> list[str]:
    """Stop everything, in the reverse order of ``up``.

    ``unless_in_use``: the end of one test session (`task test`'s) leaves the
    stack to the next, waiting for its turn (devstack.sessions), rather than
    stop what that one would start again at once.
    """
    if unless_in_use and (users := lock.in_use(cfg.run_dir, lock.SESSIONS)) is not None:
        whose = f" (pid {', '.join(map(str, users))})" if users else ""
        raise InUse(f"left running: test sessions still use it{whose}")
    cfg = as_running(cfg)  # read while it runs: epmd's port, for the end
    stopped = stop_mesh(cfg)
    have = running(cfg.run_dir)
    for name in reversed(INFRA):
        if name in have:
            sig = signal.SIGINT if name == "postgres" else signal.SIGTERM  # SIGINT: fast shutdown
            stop(cfg.run_dir, name, sig=sig, grace=STOP_GRACE)
            stopped.append(name)
    for name in set(running(cfg.run_dir)) - set(stopped):  # anything started meanwhile
        stop(cfg.run_dir, name)
        stopped.append(name)
    rabbitmq.stop_epmd(cfg)
    return stopped


def urls(cfg: StackConfig) -> Iterable[tuple[str, str]]:
    yield "API (through Envoy)", cfg.api_url + "/api/v1"
    yield "Consul UI", cfg.consul_url + "/ui/"
    yield "RabbitMQ UI (guest/guest)", f"http://127.0.0.1:{cfg.ports.rabbitmq_management}/"
    yield "Mail sink API", cfg.mail_api_url + "/api/v1/messages"
    yield "Envoy admin", f"http://127.0.0.1:{cfg.ports.envoy_admin}/"
    yield "Logs", str(cfg.run_dir / "logs")


def registered_id(cfg: StackConfig, process: str) -> str | None:
    """The Consul service ID a process registered, read from its log."""
    try:
        lines = log_path(cfg.run_dir, process).read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if '"consul_registered"' in line:
            return str(json.loads(line)["service_id"])
    return None
