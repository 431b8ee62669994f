"""RabbitMQ of the native stack: Debian's rabbitmq-server, run as the rabbitmq user.

A module of its own, beside infra.py: the broker is the one part with an
environment of its own (its paths, ports and Erlang distribution), which
its start, its readiness check and epmd's stop all share.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from .config import ROOT, StackConfig, port_variable
from .infra import owned_dir
from .loopback import DIRECT
from .ports import holder, port_free
from .procs import Proc, StackError, run_checked


def node_name(cfg: StackConfig) -> str:
    """The broker's Erlang node name: one per run directory, kept for as long as its data is.

    Two clones' stacks may share an epmd (one there is taken as fine, and
    no message says to move MESH_PORT_EPMD), where a name of the profile
    alone was taken twice, and the second broker did not start. The node's
    data directory is named after the node: one made before (under
    ``rabbit-<profile>@localhost``, or in a directory since moved) keeps its
    name, and with it its queues, and any broker of it still running.
    """
    made = sorted(p.name for p in (cfg.run_dir / "rabbitmq" / "mnesia").glob(f"rabbit-{cfg.name}*@localhost"))
    if made:
        return made[0]
    digest = hashlib.sha256(str(cfg.run_dir.resolve()).encode()).hexdigest()[:6]
    return f"rabbit-{cfg.name}-{digest}@localhost"


def _env(cfg: StackConfig) -> dict[str, str]:
    base = cfg.run_dir / "rabbitmq"
    return {
        "HOME": str(base),
        "RABBITMQ_NODENAME": node_name(cfg),
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(cfg.ports.amqp),
        "RABBITMQ_DIST_PORT": str(cfg.ports.rabbitmq_dist),
        # Erlang distribution (how rabbitmqctl reaches the node) listens on
        # every interface unless told; RABBITMQ_NODE_IP_ADDRESS covers AMQP only.
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        "RABBITMQ_CTL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        "ERL_EPMD_PORT": str(cfg.ports.epmd),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base / "log"),
        "RABBITMQ_LOGS": "-",
        "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
        "RABBITMQ_PID_FILE": str(base / "rabbitmq.pid"),
    }


def server(cfg: StackConfig) -> Proc:
    base = owned_dir(cfg.run_dir / "rabbitmq", "rabbitmq")
    for sub in ("mnesia", "log"):
        owned_dir(base / sub, "rabbitmq")
    # The same rabbitmq.conf as compose, with our paths and loopback ports.
    # Every file it reads is copied beside its data: a clone made under
    # umask 077 is closed to the rabbitmq user.
    conf = (ROOT / "rabbitmq" / "rabbitmq.conf").read_text()
    conf = conf.replace("/etc/rabbitmq/definitions.json", str(base / "definitions.json"))
    conf = conf.replace("management.tcp.port = 15672", f"management.tcp.port = {cfg.ports.rabbitmq_management}")
    conf += "management.tcp.ip = 127.0.0.1\n"
    for name, text in (
        ("rabbitmq.conf", conf),
        ("enabled_plugins", (ROOT / "rabbitmq" / "enabled_plugins").read_text()),
        ("definitions.json", (ROOT / "rabbitmq" / "definitions.json").read_text()),
    ):
        (base / name).write_text(text)
        if os.geteuid() == 0:  # else RabbitMQ runs as us, and the files are ours already
            shutil.chown(base / name, "rabbitmq", "rabbitmq")
    return Proc("rabbitmq", ["/usr/lib/rabbitmq/bin/rabbitmq-server"], env=_env(cfg), user="rabbitmq")


def ready(cfg: StackConfig) -> bool:
    run_checked(
        ["/usr/lib/rabbitmq/bin/rabbitmq-diagnostics", "-q", "check_port_connectivity"],
        env=_env(cfg),
        user="rabbitmq",
        timeout=20,
    )
    return True


def rabbitmqctl(cfg: StackConfig, *args: str, timeout: float = 30) -> str:
    """``rabbitmqctl`` against the stack's node, as the stack runs it: the rabbitmq user, the node's environment."""
    argv = ["/usr/lib/rabbitmq/bin/rabbitmqctl", "-q", *args]
    return run_checked(argv, env=_env(cfg), user="rabbitmq", timeout=timeout)


def management(cfg: StackConfig, method: str, path: str, body: object = None) -> Any:
    """A call to the broker's management API (``path`` after ``/api``), as guest: its JSON answer, if any."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{cfg.ports.rabbitmq_management}/api{path}",
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={
            "Authorization": "Basic " + base64.b64encode(b"guest:guest").decode(),
            "Content-Type": "application/json",
        },
    )
    with DIRECT.open(request, timeout=10) as response:
        raw = response.read()
    return json.loads(raw) if raw else None


def vhost(cfg: StackConfig, name: str) -> str:
    """The broker URL of virtual host ``name``, made (with guest's permissions) if need be."""
    # Idempotent PUTs.
    management(cfg, "PUT", f"/vhosts/{name}", {})
    management(cfg, "PUT", f"/permissions/{name}/guest", {"configure": ".*", "write": ".*", "read": ".*"})
    return cfg.amqp_url + name


def require_epmd_port(cfg: StackConfig) -> None:
    """Refuse to start RabbitMQ where the profile's epmd port is held by anything but an epmd.

    An epmd there is fine (one left by a stack before, or another node's):
    RabbitMQ registers with it. Anything else, and the node fails to start
    with an Erlang error in its log.
    """
    port = cfg.ports.epmd
    if port_free("127.0.0.1", port):
        return
    held = holder(port)
    if held is None or Path(held[1].split(" ", 1)[0]).name == "epmd":  # None: /proc cannot say
        return
    raise StackError(
        f"port {port} (epmd, for RabbitMQ) is already in use, held by pid {held[0]}: {held[1][:120]}."
        f" Stop what holds it, or move ours: {port_variable('epmd')}=<port>"
    )


def stop_epmd(cfg: StackConfig) -> None:
    """epmd daemonizes outside our process groups; it has its own port per stack."""
    epmd = shutil.which("epmd") or next(iter(glob.glob("/usr/lib/erlang/erts-*/bin/epmd")), None)
    if epmd:
        subprocess.run([epmd, "-port", str(cfg.ports.epmd), "-kill"], capture_output=True, check=False, timeout=10)
