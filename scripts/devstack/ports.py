"""Ports: is one free, and if not, who holds it and how to move ours; and which a running stack has."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, fields, replace
from pathlib import Path

from .config import Ports, StackConfig, port_variable
from .procs import StackError, running


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def require_free(ports: Mapping[str, int], host: str = "127.0.0.1") -> None:
    """Refuse to start on a taken port, naming what holds it and the variable that moves ours.

    Each name is a field of ``Ports``, with spaces for underscores if it
    reads better ("consul serf lan"): the variable is made from it.
    """
    taken = [name for name, port in ports.items() if not port_free(host, port)]
    if taken:
        raise StackError(
            "ports already in use: "
            + ", ".join(f"{name} ({ports[name]}{_held_by(ports[name])})" for name in taken)
            + ". Stop what holds them, or move ours: "
            + " ".join(f"{port_variable(name)}=<port>" for name in taken)
        )


def _held_by(port: int) -> str:
    """ ", held by pid N: its command", for a port some process listens on, if /proc can say.

    The likeliest holder is a stack left behind by a run that was killed,
    perhaps from another checkout, whose pid files this one cannot see.
    """
    held = holder(port)
    return f", held by pid {held[0]}: {held[1][:120]}" if held is not None else ""


def holder(port: int) -> tuple[int, str] | None:
    """The pid and command line of a process that listens on ``port``, if /proc can say."""
    listening = {inode for inode, (_, bound) in _listening().items() if bound == port}
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in listening for fd in fd_dir.iterdir()):
                command = (fd_dir.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                return int(fd_dir.parent.name), command.strip()
    return None


def listeners(pids: Iterable[int]) -> set[tuple[str, int]]:
    """The addresses and ports that these processes listen on (TCP), as far as /proc can say."""
    listening = _listening()
    found = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    if (bound := listening.get(os.readlink(fd))) is not None:
                        found.add(bound)
    return found


def _listening() -> dict[str, tuple[str, int]]:
    """Every listening TCP socket, by the name of its fd's link ("socket:[inode]"), with its address and port."""
    found = {}
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        with contextlib.suppress(OSError), open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                # local address "0100007F:3C28" (in the host's byte order, by 32-bit words), state 0A (LISTEN), inode
                if fields[3] == "0A":
                    address, port = fields[1].rsplit(":", 1)
                    packed = bytes.fromhex(address)
                    if sys.byteorder == "little":
                        packed = b"".join(packed[i : i + 4][::-1] for i in range(0, len(packed), 4))
                    found[f"socket:[{fields[9]}]"] = (socket.inet_ntop(family, packed), int(port, 16))
    return found


# In the run directory: the ports the stack there was started on.
RECORD = "ports.json"


def record(run_dir: Path, ports: Ports) -> None:
    """Note the ports a stack starts on, for the commands after to be held to them."""
    run_dir.mkdir(parents=True, exist_ok=True)
    partial = run_dir / f"{RECORD}.partial"
    partial.write_text(json.dumps(asdict(ports)) + "\n")
    partial.replace(run_dir / RECORD)


def recorded(run_dir: Path) -> dict[str, int]:
    """The ports the stack in ``run_dir`` was started on; none for one started before they were recorded."""
    try:
        started_on = json.loads((run_dir / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    # Ports' fields alone: a name recorded by other code (another branch's) would break replace().
    names = {f.name for f in fields(Ports)}
    return {name: port for name, port in started_on.items() if name in names}


def as_running(cfg: StackConfig) -> StackConfig:
    """``cfg`` on the ports its stack runs on, while it runs: what a command after `up` talks to.

    Not the shell's: after `MESH_PORT_AMQP=5673 task up`, `task dlq` went to 5672.
    """
    if not running(cfg.run_dir):
        return cfg
    return replace(cfg, ports=replace(cfg.ports, **recorded(cfg.run_dir)))


def require_recorded(run_dir: Path, ports: Ports) -> None:
    """Refuse ports other than those the running stack was started on.

    Its Envoy and infrastructure are reused as they are: what started on the
    new ports waited 90 s for them there, in vain, and then failed. A stack
    started before ports were recorded has nothing to be held to.
    """
    started_on = recorded(run_dir)
    changed = [
        f"{name.replace('_', ' ')} on {port} (it runs on {started_on[name]}; {port_variable(name)})"
        for name, port in asdict(ports).items()
        if name in started_on and started_on[name] != port
    ]
    if changed:
        raise StackError(
            f"the stack in {run_dir} runs on other ports than this asks for: {'; '.join(changed)}."
            " A running stack keeps its ports: give the same MESH_PORT_* values as the start did,"
            " or `task down` first to move them"
        )
